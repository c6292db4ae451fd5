"""Dataset index, natural frame order, frame selection and decoding. Knows nothing about models.

A *video* is either a folder of frames (jpg/jpeg/png, any case) or a video file (avi, mp4, mkv,
webm, mov) decoded with PyAV. Frames are returned as uint8 RGB tensors of shape (3, H, W).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

try:
    import simplejpeg as _simplejpeg
except ImportError:  # an optional speed-up; torchvision decodes the same pixels
    _simplejpeg = None

from .config import DatasetSpec, FrameSelection
from .errors import ConfigError, DataError, PipelineError
from .preprocess import nhwc_view

log = logging.getLogger(__name__)

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png"})
# Video files by name (PyAV opens each by its content): the usual containers, phones' .3gp and
# .m4v, MPEG program and transport streams (.mpg, camcorders' .mts/.m2ts), .flv, .wmv, .ogv.
VIDEO_EXTS = frozenset({".avi", ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".3gp", ".mpg", ".mpeg", ".ts", ".mts",
                        ".m2ts", ".flv", ".wmv", ".ogv"})

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``frame_2`` before ``frame_10`` (digit runs compare as numbers)."""
    parts = _DIGITS.split(name)
    key = tuple((0, int(p), "") if i % 2 else (1, 0, p.lower()) for i, p in enumerate(parts))
    return key + ((2, 0, name),)  # exact name breaks ties such as "a1" vs "a01"


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _utf8(p: Path | str) -> bool:
    """False for names that are not valid UTF-8 (e.g. unpacked from a Latin-1 archive)."""
    name = p if isinstance(p, str) else p.name
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def printable(p: Path | str) -> str:
    """A path as text that prints and stores anywhere: bytes that are not UTF-8 appear as \\xNN."""
    return os.fsencode(p).decode("utf-8", "backslashreplace")


def _bad_name(p: Path) -> str:
    return f"ignored '{printable(p)}': its name is not valid UTF-8; rename it"


@dataclass(frozen=True)
class Skipped:
    """A name or an unreadable folder that indexing left out; the cache lists these as failures."""

    split: str | None  # the split it belongs to, where known
    path: str  # printable, relative to the dataset root when inside it
    reason: str
    kind: Literal["name", "folder", "missing"]  # missing: a split file lists it, the disk has no such video


class _Report:
    """Warnings and skipped entries gathered while indexing."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.warnings: list[str] = []
        self.skipped: list[Skipped] = []

    def skip(self, split: str | None, path: Path, reason: str, kind: Literal["name", "folder"]) -> None:
        rel = path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)
        self.skipped.append(Skipped(split, printable(rel), reason, kind))
        self.warnings.append(reason)

    def listdir(self, folder: Path, what: str, split: str | None) -> list[Path] | None:
        """Entries of ``folder`` in natural order, or None (and a warning) if it cannot be read."""
        try:
            return sorted(folder.iterdir(), key=lambda p: natural_key(p.name))
        except OSError as e:
            self.skip(split, folder, f"cannot read {what} folder {printable(folder)} ({e.strerror or e}): "
                                     "skipped it; check its permissions", "folder")
            return None


@dataclass(frozen=True)
class Video:
    """One labelled video: ``rel`` is its path relative to the dataset root, POSIX style."""

    path: Path
    rel: str
    label: int
    split: str
    kind: Literal["frames", "file"]


@dataclass
class DatasetIndex:
    root: Path
    classes: list[str]
    splits: dict[str, list[Video]]
    warnings: list[str] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    layout: str = "<root>/<split>/<class>/<video>"  # what was looked for, for "no videos found"
    # Splits on disk that ``DatasetSpec.splits`` left out: a run that writes only some splits
    # keeps the others from an earlier run, and must know whether they still match the dataset.
    unselected: dict[str, list[Video]] = field(default_factory=dict)

    def videos(self, split: str) -> list[Video]:
        return self.splits[split]

    @property
    def num_videos(self) -> int:
        return sum(len(v) for v in self.splits.values())


def video_kind(path: Path) -> Literal["frames", "file"] | None:
    """What ``path`` is as a video, or None if it is neither a frame folder nor a video file."""
    if path.is_dir():
        return "frames"
    if path.is_file() and path.suffix.lower() in VIDEO_EXTS:
        return "file"
    return None


def video_name(name: str) -> str:
    """A video's name without its video extension: ``c1`` for ``c1.avi``, ``c1.mp4`` and a frame
    folder ``c1`` or ``c1.avi`` (decoded into a folder of the file's name); ``A.B_run`` stays."""
    p = Path(name)
    return p.stem if p.suffix.lower() in VIDEO_EXTS else name


def one_per_name(videos: Iterable[Path], warnings: list[str], why: str) -> list[Path]:
    """``videos`` of one class folder, one per ``video_name``: a frame folder and the file it was
    decoded from, or one video in two containers, are one video; the frame folder is kept, else
    the first in order, with a warning (``why``: to whom they are one)."""
    kept: dict[str, Path] = {}
    for v in videos:
        key = video_name(v.name)
        seen = kept.get(key)
        if seen is not None:
            keep = v if v.is_dir() and not seen.is_dir() else seen
            warnings.append(f"{v} and {seen} are one video {why}; using {keep}")
            v = keep
        kept[key] = v
    return list(kept.values())


def _is_frame(p: Path) -> bool:
    """A frame's name: what is no regular file under it (a dangling link, a folder) is a frame that
    does not decode, dropped with its index as a corrupt one is, not a gap closed without a word."""
    return _visible(p) and p.suffix.lower() in IMAGE_EXTS


# mmaction2's rawframes (tools/data/build_rawframes.py, denseflow) put each video's RGB frames,
# img_00001.jpg ..., in one folder with its optical flow, flow_x_/flow_y_ (x_/y_ in older versions).
# Its RGB template is img_{:05}.jpg by default, {:05}.jpg or image_{:05}.jpg in some configs.
_RGB_FRAMES, _FLOW_FRAMES = frozenset({"img_#", "image_#", "#"}), frozenset({"flow_x_#", "flow_y_#", "x_#", "y_#"})


def _sequence(name: str) -> str | None:
    """The numbered sequence a frame name belongs to: its stem with each digit run as '#'
    (``img_00001.jpg`` → ``img_#``, ``clip2_frame7.png`` → ``clip#_frame#``); None without digits."""
    stem = Path(name).stem
    key = _DIGITS.sub("#", stem).lower()
    return None if key == stem.lower() else key


# Appended to a video file's signature since frames are numbered as a player shows them and read
# upright (``_demux``, ``frame_rgb``): a record without it was made by an earlier version.
UPRIGHT = " upright"
# The signature of a frame folder that is readable but no one video (two numbered sequences): a
# change from what was cached, so a rerun tries it, and decoding reports it as skipped.
NOT_ONE_VIDEO = "frames:not one video"


def source_signature(path: Path, kind: str) -> str:
    """What a video's source is, read without decoding: a frame folder's frame names and sizes, a
    file's size (and that its frames are read upright); '' where it cannot be read. Stored with its
    features, so that a rerun redoes a video whose frames were added, removed or replaced (a
    same-size edit goes unseen; a copy or a touch of the dataset does not count as a change)."""
    try:
        if kind == "frames":
            h = hashlib.sha1()
            for f in list_frames(path):  # a frame that is no file (a dangling link) as size -1
                size = f.stat().st_size if f.is_file() else -1
                h.update(f"{f.name}\0{size}\n".encode("utf-8", "surrogateescape"))
            return f"frames:{h.hexdigest()[:16]}"
        return f"bytes:{path.stat().st_size}{UPRIGHT}"
    except VideoDecodeError:
        return NOT_ONE_VIDEO
    except (OSError, PipelineError):
        return ""


def recorded_before_upright(was: str, now: str) -> bool:
    """Whether a video file's record (signature ``was``; '' from versions that kept none) predates
    frames numbered as shown and read upright, the file being the same (signature ``now``)."""
    return now.endswith(UPRIGHT) and was in ("", now.removesuffix(UPRIGHT))


def read_as_recorded(path: Path, sel: FrameSelection, stored: Sequence[int] | None) -> bool:
    """Whether this version would extract the same rows from video file ``path`` as an earlier one
    stored (source frame indices ``stored``): the same frames kept by ``sel`` (a cut clip's
    frames are numbered from the first shown; --fps on millisecond timestamps), none turned by a
    display rotation. Demuxes the file and decodes its first frame; False if it cannot be read."""
    import av

    if stored is None:
        return False
    try:
        if selected_positions(path, "file", sel) != [int(i) for i in stored]:
            return False
        container, stream = _open_video(path)
        try:
            frame = next(container.decode(stream), None)
        finally:
            container.close()
    except (VideoDecodeError, av.FFmpegError, OSError):
        return False
    return frame is not None and quarter_turns(frame) == 0


def list_frames(folder: Path) -> list[Path]:
    """Image files of a frame folder in natural order; hidden files, other files and names that are
    not valid UTF-8 (see ``bad_frame_names``, which indexing reports) are left out.

    Names that form two or more numbered sequences are no single video read in natural order (it
    would put every frame of one before the other): mmaction2's rawframes folders give their
    RGB frames (``img_``), and any other mix is a ``VideoDecodeError`` that names the sequences, as
    is one number twice (``frame_1.jpg`` and ``frame_1.png``, or ``frame_001.png``), which would
    show every such frame twice, and an image beside one numbered sequence that is none of it
    (``cover.jpg``), which would be read as a frame and shift every index after it."""
    frames = sorted((p for p in folder.iterdir() if _utf8(p) and _is_frame(p)), key=lambda p: natural_key(p.name))
    number = [natural_key(p.stem)[:-1] for p in frames]  # the name's parts, digit runs as numbers
    if twice := next((i for i in range(1, len(frames)) if number[i] == number[i - 1]), None):
        raise VideoDecodeError(f"{folder}: {frames[twice - 1].name} and {frames[twice].name} are one frame number "
                               "twice; keep one of them")
    count: dict[str | None, int] = defaultdict(int)
    for p in frames:
        count[_sequence(p.name)] += 1
    runs = sorted(k for k, n in count.items() if k is not None and n > 1)
    if len(runs) == 1 and (stray := [p.name for p in frames if _sequence(p.name) != runs[0]]):
        raise VideoDecodeError(f"{folder}: {some(stray, 3)} {'is' if len(stray) == 1 else 'are'} no frame of its "
                               f"numbered sequence ({runs[0]}, # a number) and would be read as frames of the video "
                               "(a cover or thumbnail?); move it out of the video folder")
    if len(runs) < 2:
        return frames
    rgb = [r for r in runs if r in _RGB_FRAMES]
    if len(rgb) == 1 and set(runs) - set(rgb) <= _FLOW_FRAMES:
        return [p for p in frames if _sequence(p.name) == rgb[0]]
    raise VideoDecodeError(f"{folder}: frames of {len(runs)} numbered sequences in one folder "
                           f"({', '.join(runs)}, # a number); keep one sequence per video folder")


def bad_frame_names(folder: Path) -> list[Path]:
    """Frames that ``list_frames`` leaves out because their names are not valid UTF-8."""
    try:
        names = os.listdir(folder)  # names only: most folders are all ASCII and cost nothing more
    except OSError:
        return []  # decoding reports a folder it cannot read
    bad = [folder / n for n in names if not _utf8(n)]
    return sorted((p for p in bad if _is_frame(p)), key=lambda p: natural_key(p.name))


# --------------------------------------------------------------------------------------- index


def index_dataset(spec: DatasetSpec) -> DatasetIndex:
    """Index a dataset; the class list is the sorted union over every split found on disk."""
    root = Path(spec.root)
    if not root.exists():
        raise DataError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"dataset path is a file, not a folder: {root}")
    if spec.split_files or spec.split_dir:
        index = _index_from_split_files(root, spec)
    else:
        index = _index_split_tree(root)
    for split, videos in index.splits.items():  # every split, so each run lists the same names
        for v in videos:
            for f in bad_frame_names(v.path) if v.kind == "frames" else ():
                index.skipped.append(Skipped(split, v.rel, _bad_name(f), "name"))
                index.warnings.append(_bad_name(f))
    if spec.splits is not None:
        missing = [s for s in spec.splits if s not in index.splits]
        if missing:
            raise DataError(
                f"split {missing[0]!r} not found under {root} "
                f"(found: {', '.join(sorted(index.splits)) or 'none'}); check --splits"
            )
        index.unselected = {s: vs for s, vs in index.splits.items() if s not in spec.splits}
        index.splits = {s: index.splits[s] for s in spec.splits}
    if index.num_videos == 0:
        raise DataError(
            f"no videos found under {root}: expected {index.layout}, where a video is "
            f"a folder of jpg/png frames or a {'/'.join(sorted(e[1:] for e in VIDEO_EXTS))} file"
        )
    _check_duplicates(index)
    return index


def _index_split_tree(root: Path) -> DatasetIndex:
    try:
        top = sorted((p for p in root.iterdir() if _visible(p)), key=lambda p: natural_key(p.name))
    except OSError as e:
        raise DataError(f"cannot read dataset folder {root} ({e.strerror or e}); check its permissions") from e
    report = _Report(root)
    split_dirs = []
    for p in top:
        if not _utf8(p):
            report.skip(None, p, _bad_name(p), "name")
        elif not p.is_dir():
            raise DataError(
                f"expected split folders (train/, test/, ...) in {root}, found a file: {p}; "
                "move it out of the dataset folder"
            )
        else:
            split_dirs.append(p)
    warnings = report.warnings
    per_split: dict[str, dict[str, list[Path]]] = {}
    for split_dir in split_dirs:
        split = split_dir.name
        classes: dict[str, list[Path]] = {}
        listing = report.listdir(split_dir, "split", split)
        if listing is None:
            continue
        for class_dir in listing:
            if not _visible(class_dir):
                continue
            if not _utf8(class_dir):
                report.skip(split, class_dir, _bad_name(class_dir), "name")
                continue
            if not class_dir.is_dir():
                if video_kind(class_dir) == "file":
                    raise DataError(
                        f"video file directly in a split folder: {class_dir}; the layout is "
                        "<root>/<split>/<class>/<video>, or for a flat <root>/<class>/<video> tree "
                        "(HMDB51, UCF101) pass the official split files with --split-dir"
                    )
                raise DataError(
                    f"expected class folders in {split_dir}, found a file: {class_dir}; "
                    "move it out of the dataset folder"
                )
            entries = report.listdir(class_dir, "class", split)
            classes[class_dir.name] = videos = []  # an unreadable class keeps its label
            if entries is None:
                continue
            for v in entries:
                if not _visible(v):
                    continue
                if not _utf8(v):
                    report.skip(split, v, _bad_name(v), "name")
                    continue
                if video_kind(v) is None:
                    warnings.append(f"ignored {v}: not a frame folder or a video file")
                    continue
                videos.append(v)
            videos[:] = one_per_name(videos, warnings, "(one name; as two, one could be trained on and the other "
                                                      "validated on)")
            if not videos:
                warnings.append(f"class folder {class_dir} has no videos")
        if not any(classes.values()):
            warnings.append(f"split folder {split_dir} has no videos")
        per_split[split] = classes
    class_names = sorted({c for cls in per_split.values() for c in cls})
    _warn_class_names(class_names, warnings)
    if "train" in per_split:
        untrained = [c for c in class_names if not per_split["train"].get(c)]
        if untrained and len(untrained) < len(class_names):
            warnings.append(f"{len(untrained)} class(es) have no videos in {root / 'train'} "
                            f"({some(untrained)}): "
                            "a model trained on it cannot learn them")
    label = {c: i for i, c in enumerate(class_names)}
    splits = {
        split: [
            Video(path=v, rel=v.relative_to(root).as_posix(), label=label[c], split=split,
                  kind=video_kind(v))  # type: ignore[arg-type]
            for c in sorted(cls, key=label.__getitem__)
            for v in cls[c]
        ]
        for split, cls in per_split.items()
    }
    return DatasetIndex(root=root, classes=class_names, splits=splits, warnings=warnings,
                        skipped=report.skipped)


_HMDB_FILE = re.compile(r"^(?P<cls>.+)_test_split(?P<id>\d+)\.txt$")
_UCF_FILE = re.compile(r"^(?P<split>train|test)list0*(?P<id>\d+)\.txt$", re.IGNORECASE)


def _split_files_for(spec: DatasetSpec) -> list[Path]:
    files = [Path(f) for f in spec.split_files]
    if spec.split_dir:
        d = Path(spec.split_dir)
        if not d.is_dir():
            raise DataError(f"split folder not found: {d}")
        for f in sorted(d.iterdir()):
            m = _HMDB_FILE.match(f.name) or _UCF_FILE.match(f.name)
            if m and int(m["id"]) == spec.split_id:
                files.append(f)
        if not files:
            raise DataError(
                f"no split files for --split-id {spec.split_id} in {d}: expected HMDB51 "
                f"'<class>_test_split{spec.split_id}.txt' or UCF101 'trainlist0{spec.split_id}.txt'"
            )
    for f in files:
        if not f.is_file():
            raise DataError(f"split file not found: {f}")
    return files


class _Entry(NamedTuple):
    """One video listed in a split file, with the place that lists it (``file:line``) for messages."""

    split: str
    cls: str
    name: str
    where: str


def _plain(name: str) -> bool:
    """One path component: not empty, not '.' or '..', no separator."""
    return name not in ("", ".", "..") and "/" not in name and "\\" not in name


def _read_lines(f: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; a UTF-8 byte order mark is dropped."""
    for n, ln in enumerate(f.read_text(encoding="utf-8-sig", errors="replace").splitlines(), 1):
        if ln.strip():
            yield n, ln.strip()


def _parse_split_files(files: Sequence[Path], report: _Report) -> list[_Entry]:
    """Videos listed in HMDB51 or UCF101 annotation files, each as exactly ``<class>/<video>``."""
    entries: list[_Entry] = []
    for f in dict.fromkeys(p.resolve() for p in files):  # --split-dir and --split-file may name one twice
        if not _utf8(f):  # an HMDB51 file named after a class whose name is not UTF-8
            report.skip(None, f, _bad_name(f), "name")
        elif m := _HMDB_FILE.match(f.name):
            for n, ln in _read_lines(f):
                parts = ln.rsplit(None, 1)  # '<video> <0|1|2>': a video name may hold spaces
                if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                    raise DataError(f"{f}:{n}: expected '<video>.avi 0|1|2', got {ln!r}")
                if not _plain(m["cls"]):
                    raise DataError(f"{f}:{n}: the class {m['cls']!r} taken from this file's name is not a folder "
                                    "name; name the file '<class>_test_split<N>.txt'")
                if not _plain(parts[0]):
                    raise DataError(f"{f}:{n}: expected a video file name such as 'clip.avi' (no folder, "
                                    f"'.' or '..'), got {parts[0]!r}")
                if parts[1] != "0":
                    entries.append(_Entry("train" if parts[1] == "1" else "test", m["cls"], parts[0], f"{f}:{n}"))
        elif m := _UCF_FILE.match(f.name):
            split = m["split"].lower()
            for n, ln in _read_lines(f):
                listed = re.sub(r"\s+\d+$", "", ln)  # '<class>/<video> [label]': names may hold spaces
                parts = listed.replace("\\", "/").split("/")
                if len(parts) != 2 or not all(_plain(p) for p in parts):
                    raise DataError(f"{f}:{n}: expected '<class>/<video>.avi [label]' (a class folder of the "
                                    f"dataset and a video name, no absolute path, '.' or '..'), got {ln!r}")
                entries.append(_Entry(split, parts[0], parts[1], f"{f}:{n}"))
        else:
            raise DataError(
                f"unrecognised split file name: {f}; expected HMDB51 '<class>_test_split<N>.txt' "
                "or UCF101 'trainlist0<N>.txt' / 'testlist0<N>.txt'"
            )
    return entries


def _index_from_split_files(root: Path, spec: DatasetSpec) -> DatasetIndex:
    report = _Report(root)
    entries = _parse_split_files(_split_files_for(spec), report)
    warnings = report.warnings
    on_disk: dict[str, dict[str, Path]] = {}  # class → stem → path (folder or file)
    unreadable: set[str] = set()
    first: dict[str, str] = {}  # each class → the first line naming it, in file order
    for e in entries:
        first.setdefault(e.cls, e.where)
    real_root = root.resolve()
    for cls, where in first.items():
        cdir = root / cls
        if not cdir.is_dir():
            hint = " (the split file is not valid UTF-8 here)" if "\ufffd" in cls else ""
            raise DataError(f"{where}: class folder {cdir} does not exist{hint}; check --data-dir (the folder "
                            "that holds the class folders) and this line")
        if not cdir.resolve().is_relative_to(real_root):
            raise DataError(f"{where}: class folder {cdir} resolves to {cdir.resolve()}, outside the dataset "
                            f"folder {root}; move the class folder into it")
        on_disk[cls] = {}
        listing = report.listdir(cdir, "class", None)
        if listing is None:  # the class keeps its label; its videos are not reported missing one by one
            unreadable.add(cls)
            continue
        named = []
        for v in listing:
            if not _visible(v) or video_kind(v) is None:
                continue
            if not _utf8(v):
                report.skip(None, v, _bad_name(v), "name")
                continue
            named.append(v)
        # one name in the split files ('c1.avi'): c1/ and c1.avi, or c1.avi and c1.mp4
        on_disk[cls] = {video_name(v.name): v for v in one_per_name(named, warnings, "to the split files")}
    class_names = sorted(on_disk)
    _warn_class_names(class_names, warnings)
    try:
        unlisted = [p.name for p in sorted(root.iterdir(), key=lambda p: natural_key(p.name))
                    if _visible(p) and p.is_dir() and p.name not in on_disk and _has_videos(p)]
    except OSError:  # a root one may enter but not list: the split files name every folder used
        unlisted = []
    if unlisted:
        warnings.append(f"{len(unlisted)} class folder(s) of {root} are in no split file "
                        f"({some(unlisted)}): their videos are not used; "
                        "check that every class has its split file")
    label = {c: i for i, c in enumerate(class_names)}
    splits: dict[str, list[Video]] = defaultdict(list)
    missing = repeated = 0
    listed: dict[Path, _Entry] = {}  # each video on disk → the first line that lists it
    for e in entries:
        split, cls, name, where = e
        path = on_disk[cls].get(video_name(name))
        if path is None and cls in unreadable:
            continue
        if path is None:  # a video of the official split this dataset lacks: in the cache's failures too
            missing += 1
            if missing <= 3:
                warnings.append(f"{root / cls / name} is listed in the split files but not on disk")
            report.skipped.append(Skipped(split, printable(f"{cls}/{name}"), f"{printable(where)} lists "
                                          f"{printable(root / cls / name)}, which is not on disk", "missing"))
            continue
        if path in listed:  # a repeated line, or 'x.avi' and 'x.mp4' naming one video
            earlier = listed[path]
            if earlier.split != split:
                raise DataError(f"{where}: {path} is listed for split {split!r}, but {earlier.where} lists it "
                                f"for {earlier.split!r}; a video can be in one split only, fix the split files")
            repeated += 1
            if repeated <= 3:
                warnings.append(f"{where}: {path} is listed again (first at {earlier.where}); it is used once")
            continue
        listed[path] = e
        splits[split].append(Video(path=path, rel=path.relative_to(root).as_posix(), label=label[cls],
                                   split=split, kind=video_kind(path)))  # type: ignore[arg-type]
    if missing > 3:
        warnings.append(f"... {missing} videos listed in the split files are missing on disk in all")
    if repeated > 3:
        warnings.append(f"... {repeated} lines of the split files repeat a video listed before, in all")
    ordered = {
        s: sorted(vs, key=lambda v: (v.label, natural_key(v.rel))) for s, vs in sorted(splits.items())
    }
    example = f"e.g. {root / entries[0].cls / entries[0].name}; " if entries else ""
    layout = f"<root>/<class>/<video> as the split files list them ({example}a flat tree, no split folders)"
    return DatasetIndex(root=root, classes=class_names, splits=ordered, warnings=warnings,
                        skipped=report.skipped, layout=layout)


def some(names: Sequence[str], n: int = 5) -> str:
    """The first ``n`` of ``names`` for a message, with ', ...' when there are more."""
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")


def _warn_class_names(classes: Sequence[str], warnings: list[str]) -> None:
    """Class folders whose names differ only in case are two classes: say so."""
    by_lower: dict[str, list[str]] = defaultdict(list)
    for c in classes:
        by_lower[c.lower()].append(c)
    for names in by_lower.values():
        if len(names) > 1:
            warnings.append(f"class folders {' and '.join(repr(n) for n in names)} differ only in case: they are "
                            f"{len(names)} classes; rename them to one name if they are one")


def _has_videos(folder: Path) -> bool:
    try:
        return any(_visible(v) and video_kind(v) is not None for v in folder.iterdir())
    except OSError:
        return False


def _content_key(v: Video, deep: bool) -> str | None:
    """What tells a video's content from another's of the same name, cheap (``deep`` False: a file's
    size, a folder's frame names, no stat) or close (a hash of a file's first and last MiB; a
    folder's ``source_signature``, which stats every frame, and its first and last frame's bytes);
    None where it cannot be read."""
    try:
        if v.kind == "file":
            size = v.path.stat().st_size
            if not deep:
                return f"{size}"
            with open(v.path, "rb") as f:
                h = hashlib.sha1(f.read(1 << 20))
                f.seek(max(size - (1 << 20), 0))
                h.update(f.read())
            return f"{size}:{h.hexdigest()}"
        if not deep:
            with os.scandir(v.path) as it:
                names = sorted(e.name for e in it if not e.name.startswith(".")
                               and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)  # as _is_frame
            return hashlib.sha1("\0".join(names).encode("utf-8", "surrogateescape")).hexdigest()
        sig = source_signature(v.path, v.kind)
        if sig in ("", NOT_ONE_VIDEO):
            return None
        frames = list_frames(v.path)  # and the bytes of its first and last frame: names and sizes
        h = hashlib.sha1(sig.encode())  # alone are one for all same-size frames (uncompressed PNG)
        for f in frames[:1] + frames[-1:]:
            h.update(f.read_bytes())
        return h.hexdigest()
    except (OSError, PipelineError):
        return None


def _same_content(videos: list[Video]) -> list[list[Video]]:
    """The groups of two or more of ``videos`` (of one name) with the same content: the cheap key
    first, the close one only within a group that the cheap one leaves."""
    groups = [videos]
    for deep in (False, True):
        refined = []
        for g in groups:
            by: dict[tuple[str, str], list[Video]] = defaultdict(list)
            for v in g:
                if (k := _content_key(v, deep)) is not None:
                    by[v.kind, k].append(v)
            refined += [x for x in by.values() if len(x) > 1]
        groups = refined
    return groups


def _check_duplicates(index: DatasetIndex) -> None:
    """One video under one name in two classes (copied into both: two labels) is refused; in two
    splits (train/test leakage), a warning. A name alone does not make two videos one: datasets
    numbered per class (walk/0001.mp4, run/0001.mp4) reuse names for other videos. So videos of one
    name count as the same only where their content is (``_same_content``), read only for the
    names that repeat."""
    def name(v: Video) -> str:
        return v.path.stem if v.kind == "file" else v.path.name

    by_name: dict[str, list[Video]] = defaultdict(list)
    for videos in index.splits.values():
        for v in videos:
            by_name[name(v)].append(v)
    leaked = []
    for n, vs in by_name.items():
        if len(vs) < 2:
            continue
        for group in _same_content(vs):
            for a, b in itertools.combinations(group, 2):
                if a.split == b.split and a.label != b.label:
                    raise DataError(f"video {n!r} is in two classes of split {a.split!r}, the same content in both: "
                                    f"{a.path} and {b.path}; a video must have one label, remove one of them")
            if len({v.split for v in group}) > 1:
                leaked.append(n)
    if leaked:
        index.warnings.append(
            f"{len(leaked)} video(s) appear in more than one split, the same name and content (e.g. {leaked[0]!r}): "
            "check for train/test leakage"
        )


# ----------------------------------------------------------------------------- frame selection


def select_indices(n: int, stride: int = 1, max_frames: int | None = None) -> list[int]:
    """Positions 0..n-1 kept by ``stride``, then at most ``max_frames`` of those, uniformly spaced."""
    kept = list(range(0, n, stride))
    if max_frames is not None and len(kept) > max_frames:
        # Centre of each of max_frames equal segments: deterministic and symmetric.
        pos = ((np.arange(max_frames) + 0.5) * len(kept) / max_frames).astype(np.int64)
        kept = [kept[i] for i in pos]
    return kept


class RateSampler:
    """Resampling to at most ``fps``, one frame at a time: a frame (its time in seconds from the
    first, ascending) is kept when it is the first at or after the next sampling instant k/fps.
    A source slower than ``fps`` keeps every frame: nothing is duplicated.

    ``slack``: how far before an instant a frame still counts as at it (``rate_slack``)."""

    def __init__(self, fps: float, slack: float = 0.0) -> None:
        self.period, self.k, self.eps = 1.0 / fps, 0, 1e-6 + slack

    def keep(self, t: float) -> bool:
        eps = self.eps
        if t + eps < self.k * self.period:
            return False
        self.k = math.floor((t + eps) / self.period) + 1
        return True


def rate_slack(tick: float, frame_period: float | None) -> float:
    """Half a tick of timestamps whose resolution ``tick`` (the stream's time base) is finer than
    half the frame period (``frame_period``), else 0. Matroska and WebM store times in
    milliseconds, so a 30 fps frame at 133.33 ms reads as 133 ms, just before the sampling instant
    it is at: without the slack, --fps 7.5 kept frames 0, 5, 8, 12, 17, ... there against 0, 4, 8,
    12, 16, ... from the same video as an MP4 or a frame folder (and 120 fps to --fps 30 kept 0,
    5, 8, 12). Where a tick is a frame period (AVI), times are exact frame counts, and half a tick
    would move the sampling by a frame."""
    if not tick or not frame_period or tick >= 0.5 * frame_period:
        return 0.0
    return tick / 2


def select_by_rate(times: Sequence[float], fps: float, tick: float = 0.0) -> list[int]:
    """Indices of frames (times in seconds, ascending, to ``tick`` seconds) that resample the
    video to at most ``fps`` (``RateSampler``, times measured from the first frame)."""
    if not len(times):
        return []
    period = float(np.median(np.diff(times))) if len(times) > 1 else None
    rate, t0 = RateSampler(fps, rate_slack(tick, period)), times[0]
    return [i for i, t in enumerate(times) if rate.keep(t - t0)]


def apply_selection(times: Sequence[float] | None, n: int, sel: FrameSelection, tick: float = 0.0) -> list[int]:
    """Source frame indices kept from a video of ``n`` frames (``times`` known if rate-resampling,
    to ``tick`` seconds)."""
    base = list(range(n))
    if sel.fps is not None and times is not None:
        base = select_by_rate(times, sel.fps, tick)
    return [base[i] for i in select_indices(len(base), sel.stride, sel.max_frames)]


# ----------------------------------------------------------------------------------- decoding


class FrameDecodeError(Exception):
    """One frame (of a frame folder) could not be decoded; the rest of the video may be fine."""


class VideoDecodeError(Exception):
    """The video as a whole cannot be decoded."""


def _clean(e: Exception) -> str:
    """torchvision's C++ errors read 'decode_jpeg, /path/to/decode_jpeg.cpp:171, Image is ...':
    keep the part a user can act on."""
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"^.*\.(cpp|h):\d+, ", "", msg)


def _jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation (1 to 8) of a JPEG, from the APP1 segment among the markers before its
    image data; None without one. A few header bytes read: cheap beside the decoding."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan: the metadata is over
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xE1 and data[i + 4:i + 10] == b"Exif\0\0":
            return _tiff_orientation(data[i + 10:i + 2 + length])
        i += 2 + length
    return None


def _tiff_orientation(t: bytes) -> int | None:
    """Tag 0x0112 of the first IFD of EXIF's TIFF structure, None where it is not there."""
    order = {b"II": "little", b"MM": "big"}.get(t[:2])
    if order is None or len(t) < 8:
        return None
    ifd = int.from_bytes(t[4:8], order)  # type: ignore[arg-type]
    count = int.from_bytes(t[ifd:ifd + 2], order) if ifd + 2 <= len(t) else 0  # type: ignore[arg-type]
    for e in range(ifd + 2, min(ifd + 2 + 12 * count, len(t) - 11), 12):
        if int.from_bytes(t[e:e + 2], order) == 0x0112:  # type: ignore[arg-type]
            return int.from_bytes(t[e + 8:e + 10], order)  # type: ignore[arg-type] # a SHORT, first in its field
    return None


def _turbo_size(data: bytes) -> tuple[int, int] | None:
    """(H, W) of a JPEG that simplejpeg decodes to the same pixels as torchvision's decoder; None
    where torchvision should decode instead: not a JPEG, CMYK/YCCK (torchvision converts those its
    own way), one turned by its EXIF orientation (torchvision turns it upright, as a viewer shows
    it), a header simplejpeg cannot read, or simplejpeg not installed."""
    if _simplejpeg is None or data[:2] != b"\xff\xd8" or _jpeg_orientation(data) not in (None, 1):
        return None
    try:
        h, w, colorspace, _ = _simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (h, w) if colorspace in ("YCbCr", "Gray", "RGB") else None


def _turbo_into(data: bytes, out: np.ndarray) -> bool:
    """Decode a JPEG (of ``_turbo_size``) into ``out``, an (H, W, 3) uint8 array, through simplejpeg
    (libjpeg-turbo with its SIMD paths): the same pixels as torchvision's decoder (accurate DCT,
    fancy upsampling; tested bit for bit), about a fifth less time per frame (0.25 vs 0.31 ms for
    320x240 here). False for a damaged file: torchvision's error names what is wrong."""
    try:
        _simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=False, fastupsample=False, buffer=out)
    except ValueError:
        return False
    return True


def _decode_jpeg_turbo(data: bytes) -> torch.Tensor | None:
    """A JPEG through simplejpeg as (3, H, W) in (H, W, 3) memory, as the rest of the pipeline
    wants it; None where torchvision should decode it (``_turbo_size``, ``_turbo_into``)."""
    size = _turbo_size(data)
    if size is None:
        return None
    out = np.empty((*size, 3), np.uint8)
    return torch.from_numpy(out).permute(2, 0, 1) if _turbo_into(data, out) else None


def _read_frame(path: Path) -> bytes:
    try:
        data = path.read_bytes()  # one open + read; the GIL is released while the disk works
    except OSError as e:  # unreadable: permissions, I/O error, vanished since indexing
        raise FrameDecodeError(f"{path}: cannot read: {e.strerror or e}") from e
    if not data:
        raise FrameDecodeError(f"{path}: empty file (0 bytes)")
    return data


def _decode_frame(data: bytes, path: Path, *, turbo: bool = True) -> torch.Tensor:
    """The bytes of image file ``path`` → (3, H, W) uint8 RGB; ``turbo=False``: simplejpeg was
    already tried."""
    try:
        img = _decode_jpeg_turbo(data) if turbo else None
        if img is None:
            from torchvision.io import ImageReadMode, decode_image  # here: stage two never loads torchvision

            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               apply_exif_orientation=True)  # upright as a viewer shows it (JPEG, PNG)
    except (RuntimeError, ValueError) as e:
        if _clean(e).startswith("Unsupported image file"):  # torchvision's list of formats, not this tool's
            raise FrameDecodeError(f"{path}: not a JPEG or PNG image (its bytes are neither); replace or remove "
                                   "it") from e
        raise FrameDecodeError(f"{path}: {_clean(e)}") from e
    if img.ndim != 3:  # an animated GIF/WebP saved under an image name
        raise FrameDecodeError(f"{path}: an animation ({img.shape[0]} frames), not a single image")
    if img.dtype != torch.uint8:  # 16-bit PNG
        img = (img.to(torch.float32) * (255.0 / torch.iinfo(img.dtype).max)).round().to(torch.uint8)
    return img


def decode_image_file(path: Path) -> torch.Tensor:
    """jpg/png (grey, RGB, RGBA, palette, 16-bit) → (3, H, W) uint8 RGB."""
    return _decode_frame(_read_frame(path), path)


class DecodedFrame(NamedTuple):
    index: int  # source frame number (position in the folder's natural order / decode order)
    frame: torch.Tensor | None  # (3, H, W) uint8, or None if this frame failed to decode
    error: str | None
    skipped: Literal["frame", "frames"] = "frame"  # "frames": the rest of a truncated video (index -1)


class DecodedBatch(NamedTuple):
    """Consecutive selected frames of one size, or one frame that failed (``frames`` None)."""

    indices: list[int]  # source frame numbers
    frames: torch.Tensor | None  # (k, 3, H, W) uint8 in (k, H, W, 3) memory
    error: str | None
    skipped: Literal["frame", "frames"] = "frame"


def quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns that show a decoded PyAV frame upright (0 to 3; a display
    rotation that is not a multiple of 90° goes to the nearest, as torchcodec rounds it)."""
    return round(frame.rotation / 90) % 4


def frame_rgb(frame) -> torch.Tensor:
    """A decoded PyAV frame → (3, H, W) uint8 RGB in (H, W, 3) memory (channels_last downstream),
    upright as a player shows it: a phone's portrait recording is stored landscape with a display
    matrix (``frame.rotation``, degrees counter-clockwise), which ffmpeg's command line applies
    too, so frame folders it extracts from the file look the same."""
    rgb = frame.to_ndarray(format="rgb24")
    k = quarter_turns(frame)
    return torch.from_numpy(np.ascontiguousarray(np.rot90(rgb, k) if k else rgb)).permute(2, 0, 1)


def video_stream(container):
    """The video stream of an opened container to read (also for live sources): not a cover-art
    picture, the one with the most frames, then the largest; None if there is none. Lengths within
    a frame or 1 % of the longest count as equal: estimated from durations, they differ by a start
    offset or a B-frame delay, which must not outweigh the picture size."""
    import av

    streams = [s for s in container.streams.video
               if not (s.disposition & av.stream.Disposition.attached_pic)] or list(container.streams.video)
    length = {s.index: _stream_frames(s) for s in streams}
    longest = max(length.values(), default=0.0)
    near = [s for s in streams if length[s.index] >= longest - max(1.0, 0.01 * longest)]
    return max(near, key=lambda s: (s.width or 0) * (s.height or 0), default=None)


def _stream_frames(s) -> float:
    """A stream's frame count as its header gives it, or its duration times its frame rate where
    the header counts no frames (Matroska keeps a per-stream DURATION tag instead); 0 if unknown."""
    if s.frames:
        return float(s.frames)
    seconds = _stream_seconds(s)
    rate = s.average_rate or s.guessed_rate or s.base_rate
    return seconds * float(rate) if seconds and rate else 0.0


def _open_video(path: Path):
    """→ (container, the video stream ``video_stream`` picks); one line if there is none."""
    import av

    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        empty = path.is_file() and path.stat().st_size == 0
        raise VideoDecodeError(f"{path}: {'empty file (0 bytes)' if empty else f'cannot open video ({_av_reason(e)})'}"
                               ) from e
    stream = video_stream(container)
    if stream is None:
        container.close()
        raise VideoDecodeError(f"{path}: no video stream")
    return container, stream


class _Demuxed(NamedTuple):
    """What one demuxing pass (no decoding) learns about a video file."""

    pts: list[int]  # presentation timestamps of the frames shown (see _demux), in file order (may hold None)
    packets: int  # packets with data, shown or not
    time_base: float
    corrupt: int  # packets the demuxer flagged incomplete (a file cut inside a frame)
    last_corrupt: bool
    declared_frames: int  # the frame count the header declares, 0 if none (Matroska, WebM)
    declared_seconds: float | None  # the duration it declares
    fps: float | None


def _demux(path: Path) -> _Demuxed:
    """One pass over the packets. The frames of the video are those a player shows, numbered from
    0 at the first: not a packet the container marks discarded (the frames an MP4 edit list hides,
    as ``ffmpeg -ss … -c copy`` writes them), nor one before the first key frame (a stream-copied
    cut that starts between key frames), nor a leading picture of that key frame that refers to
    frames before it (an open GOP cut at its key frame: HEVC's RASL pictures, H.264's and MPEG-2's
    B-frames shown before their I-frame; HEVC's RADL pictures decode and count). The decoder
    outputs none of these; frame folders that ffmpeg extracts from such files start at the same
    frame."""
    import av

    container, stream = _open_video(path)
    try:
        hevc = stream.codec_context.name == "hevc"
        nal_length = _hvcc_nal_length(stream.codec_context.extradata) if hevc else None
        pts, leading, packets, corrupt, last = [], [], 0, 0, False
        keyed, key_pts, after_key = False, None, False  # after_key: in the run of packets that follows it
        for p in container.demux(stream):
            if p.size:
                packets += 1
                last = p.is_corrupt
                corrupt += last
                hidden = p.is_discard
                if not keyed and p.is_keyframe:  # a hidden key frame still starts what follows
                    keyed, key_pts, after_key = True, p.pts, True
                    if not hidden:
                        pts.append(p.pts)
                    continue
                if hidden:
                    continue
                if not keyed:
                    leading.append(p.pts)
                    continue
                # Leading pictures follow their key frame in decoding order and precede every frame
                # shown after it; a later jump back of the timestamps (joined recordings) is not one.
                after_key = after_key and None not in (p.pts, key_pts) and p.pts < key_pts
                if after_key and not (hevc and _hevc_nal_type(bytes(p), nal_length) in (6, 7)):  # not RADL
                    continue
                pts.append(p.pts)
        # No packet marked key at all (a container that does not flag them): every frame counts.
        return _Demuxed(pts if keyed else leading, packets, float(stream.time_base) if stream.time_base else 0.0,
                        corrupt, last,
                        stream.frames or 0, _declared_seconds(container, stream),
                        float(stream.average_rate) if stream.average_rate else None)
    except av.FFmpegError as e:
        raise VideoDecodeError(f"{path}: cannot read video ({e})") from e
    finally:
        container.close()


def _hvcc_nal_length(extradata: bytes | None) -> int | None:
    """Bytes of each NAL unit's length prefix in HEVC packets (MP4/Matroska ``hvcC`` extradata:
    lengthSizeMinusOne + 1); None for Annex B start codes (MPEG-TS, raw .hevc)."""
    if extradata and len(extradata) > 22 and extradata[0] == 1:
        return (extradata[21] & 3) + 1
    return None


def _hevc_nal_type(data: bytes, nal_length: int | None) -> int | None:
    """The type of the first picture (VCL) NAL unit of an HEVC packet (6/7 RADL, 8/9 RASL, ...);
    None if there is none or the packet cannot be parsed."""
    i = 0
    while i < len(data):
        if nal_length is None:  # Annex B: 00 00 01, or 00 00 00 01, before each unit
            j = data.find(b"\x00\x00\x01", i)
            if j < 0:
                return None
            i, end = j + 3, data.find(b"\x00\x00\x01", j + 3)
            end = len(data) if end < 0 else end
        else:
            size = int.from_bytes(data[i:i + nal_length], "big")
            i, end = i + nal_length, i + nal_length + size
        if i >= len(data):
            return None
        kind = (data[i] >> 1) & 0x3F
        if kind < 32:  # a slice: the picture's own type
            return kind
        i = end
    return None


def _declared_seconds(container, stream) -> float | None:
    """The stream's duration as its header declares it (``_stream_seconds``), else the container's."""
    seconds = _stream_seconds(stream)
    if seconds is not None:
        return seconds
    return container.duration / 1e6 if container.duration else None


def _stream_seconds(stream) -> float | None:
    """A stream's own duration (AVI, MP4: the stream header; Matroska: the track's DURATION tag)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = next((v for k, v in stream.metadata.items() if k.upper() == "DURATION"), None)
    if tag and (m := re.fullmatch(r"(\d+):(\d\d):(\d\d(?:\.\d*)?)", tag.strip())):
        return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    return None


def _video_pts(path: Path) -> tuple[list[int] | None, float]:
    """Presentation timestamps of every frame, sorted, read by demuxing only (no decoding), and
    the time base; None if the container does not give every packet a timestamp."""
    d = _demux(path)
    return _sorted_pts(d), d.time_base


def _sorted_pts(d: _Demuxed) -> list[int] | None:
    if not d.time_base or any(p is None for p in d.pts):
        return None
    return sorted(d.pts)


_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"uuid", b"styp", b"moof"})


def _declared_bytes(path: Path) -> int | None:
    """How long the container's own size fields say the file is: the top-level RIFF chunks (AVI),
    boxes (MP4, MOV) or Matroska/WebM segment. None for other formats or sizes left unwritten."""
    try:
        with open(path, "rb") as f:
            head = f.read(128)
            if head[:4] == b"RIFF":
                return _walk_chunks(f, little=True)
            if head[4:8] in _BOXES:
                return _walk_chunks(f, little=False)
            if head[:4] == b"\x1a\x45\xdf\xa3":
                return _ebml_segment_end(head)
    except OSError:
        pass
    return None


def _walk_chunks(f, little: bool) -> int | None:
    """End of the last top-level RIFF chunk (``little``) or ISO box, following their size fields."""
    size = os.fstat(f.fileno()).st_size
    pos = 0
    while pos + 8 <= size:
        f.seek(pos)
        h = f.read(16)
        if not all(32 <= c < 127 for c in (h[:4] if little else h[4:8])):
            return None  # not a chunk header (padding, garbage): the sizes cannot be followed
        if little:
            n = 8 + int.from_bytes(h[4:8], "little")
            n += n & 1  # chunks are padded to an even length
        else:
            n = int.from_bytes(h[:4], "big")
            if n == 1 and len(h) == 16:
                n = int.from_bytes(h[8:16], "big")
            elif n == 0:
                n = size - pos  # the last box runs to the end of the file
        if n < 8 or little and pos == 0 and n == 8:
            return None  # a size never written (a recording that was not closed)
        pos += n
    return pos


def _ebml_segment_end(head: bytes) -> int | None:
    """Where the Matroska segment ends by its size field, from the first bytes of the file."""

    def vint(i: int) -> tuple[int, int, bool]:  # → (value, length, all ones = unknown size)
        if i >= len(head) or not head[i]:
            raise IndexError
        n = 9 - head[i].bit_length()
        v = int.from_bytes(head[i:i + n], "big") & ((1 << (7 * n)) - 1)
        return v, n, v == (1 << (7 * n)) - 1

    try:
        size, n, _ = vint(4)  # the EBML header element, then the segment
        i = 4 + n + size
        if head[i:i + 4] != b"\x18\x53\x80\x67":
            return None
        size, n, unknown = vint(i + 4)
    except IndexError:
        return None
    return None if unknown else i + 4 + n + size


def _truncation(path: Path, d: _Demuxed, decoded: int) -> str | None:
    """Why a video file that decoded ``decoded`` frames is cut short, or None if it is complete.

    A header can be wrong about the length of a file that is all there (AVI frame counts often
    are), so falling short of it only counts with evidence that data is missing: the demuxer
    flagged a packet incomplete, or the file is shorter than its container's size fields say. A
    file cut only in a trailing index (every frame present) is complete. Tolerance: more than one
    frame or 1 % of the declared length missing.
    """
    what, expected, present = f"decoded {decoded} frames", 0.0, 0.0
    if d.declared_frames:
        what = f"decoded {decoded} of {d.declared_frames} frames the header declares"
        expected, present = d.declared_frames, d.packets
    elif d.declared_seconds and d.fps and (pts := _sorted_pts(d)):
        span = (pts[-1] - pts[0]) * d.time_base + 1 / d.fps  # the last frame lasts one period
        what = f"decoded {decoded} frames, {span:.2f} s of the {d.declared_seconds:.2f} s the header declares"
        expected, present = d.declared_seconds * d.fps, span * d.fps
    short = expected - present > max(1.0, 0.01 * expected)
    if not (short or d.corrupt):
        return None
    evidence = [f"{d.corrupt} incomplete packet(s)"] if d.corrupt else []
    declared, size = _declared_bytes(path), path.stat().st_size
    cut = declared is not None and declared > size + 1  # a missing pad byte is not a cut
    if cut:
        evidence.append(f"the file has {size} of the {declared} bytes its container declares")
    if not evidence:
        log.debug("%s: %s, but nothing is missing from the file: its header is wrong", path, what)
        return None
    return f"{path}: {'truncated' if cut or d.last_corrupt else 'damaged'}: {what} ({'; '.join(evidence)})"


def file_truncation(path: Path, decoded: int) -> str | None:
    """``_truncation`` of a video file read by other means (``predict --live`` on a file), by one
    demuxing pass; None where the file is complete or cannot be demuxed."""
    import av

    try:
        return _truncation(path, _demux(path), decoded)
    except (av.FFmpegError, OSError, VideoDecodeError):
        return None


def _seconds(pts: Sequence[int], tb: float) -> list[float]:
    """Sorted frame timestamps in ``tb`` units → seconds from the first frame."""
    return [(p - pts[0]) * tb for p in pts]


def frame_times(path: Path) -> list[float] | None:
    """Seconds from the first shown frame to each frame of a video file, by frame number (a
    variable-rate recording's pauses included), read by demuxing only; None without timestamps."""
    pts, tb = _video_pts(path)
    return None if pts is None else _seconds(pts, tb)


def video_fps(path: Path) -> float | None:
    container, stream = _open_video(path)
    try:
        return float(stream.average_rate) if stream.average_rate else None
    finally:
        container.close()


def iter_video_file(path: Path, sel: FrameSelection) -> Iterator[DecodedFrame]:
    """Decode the selected frames of a video file, in order, each decoded exactly once.

    A frame's index is the position of its timestamp among the timestamps of the frames shown
    (``_demux``), so it stays the true frame number even when the decoder drops a frame (a damaged
    packet). A frame the decoder gives for a packet that is not shown (hidden by an edit list, or
    reconstructed without its key frame) is passed over. Without timestamps, decoded frames are
    counted.
    """
    import av

    demuxed = _demux(path)
    pts, tb = _sorted_pts(demuxed), demuxed.time_base
    if pts is not None:
        position = {p: i for i, p in enumerate(pts)}
        keep = set(apply_selection(_seconds(pts, tb), len(pts), sel, tb))
    else:
        position = {}
        if sel.fps is not None or sel.max_frames is not None:
            raise VideoDecodeError(f"{path}: no frame timestamps, cannot apply --fps/--max-frames")
        keep = None
    container, stream = _open_video(path)
    n = 0
    stopped = None
    damaged: list[av.FFmpegError] = []  # packets the decoder refused
    decoded: set[int] = set()
    try:
        stream.thread_type = "AUTO"
        # Packet by packet, as ffmpeg does: a damaged packet costs its frame (and, until the next
        # key frame, the look of the frames that refer to it), not the rest of the video.
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                damaged.append(e)
                continue
            for frame in frames:
                if position and frame.pts is not None and frame.pts not in position:
                    continue  # not a frame of the video (see the docstring)
                i = position.get(frame.pts, n) if position else n
                n += 1
                decoded.add(i)
                if (i not in keep) if keep is not None else (i % sel.stride):
                    continue
                yield DecodedFrame(i, frame_rgb(frame), None)
    except av.FFmpegError as e:  # the file itself could not be read on
        if n == 0:
            raise VideoDecodeError(f"{path}: decoding failed ({e})") from e
        stopped = f"{path}: decoding stopped after {n} frames ({e})"  # keep the frames before it
    finally:
        container.close()
    if n == 0:
        why = f"decoding failed ({damaged[0]})" if damaged else "no decodable frames"
        raise VideoDecodeError(f"{path}: {why}")
    # A file cut short decodes without an error up to where it ends: keep those frames, but say so.
    problem = stopped or _truncation(path, demuxed, n)
    lost = _lost_frames(damaged, decoded, keep)
    if problem is not None:
        yield DecodedFrame(-1, None, problem + (f"; {lost}" if lost else ""), "frames")
    elif lost:
        yield DecodedFrame(-1, None, f"{path}: damaged: {lost}", "frame")


def _av_reason(e: Exception) -> str:
    """An FFmpeg error as its reason alone ('Invalid data found when processing input'), without
    the errno and the C function PyAV adds."""
    return getattr(e, "strerror", None) or str(e)


def _lost_frames(damaged: Sequence[Exception], decoded: Collection[int], wanted: Collection[int] | None) -> str:
    """What the ``damaged`` packets cost: the ``wanted`` frames not ``decoded`` (frame threading
    reports an error a packet or two late, so they are told by what is missing, not by the error);
    '' if nothing. ``wanted`` None: frame numbers are not known (packets without timestamps)."""
    if not damaged:
        return ""
    if wanted is None:
        return f"{len(damaged)} packet(s) could not be decoded ({_av_reason(damaged[0])}); the other frames are kept"
    lost = sorted(set(wanted) - set(decoded))
    if not lost:
        return ""
    shown = ", ".join(map(str, lost[:5])) + (", ..." if len(lost) > 5 else "")
    return (f"{len(lost)} frame(s) could not be decoded ({shown}: {len(damaged)} damaged packet(s), "
            f"{_av_reason(damaged[0])}); the others are kept")


def _folder_selection(path: Path, sel: FrameSelection) -> tuple[list[Path], list[int]]:
    files = list_frames(path)
    if not files:
        raise VideoDecodeError(f"{path}: no jpg/png frames in folder")
    return files, apply_selection(folder_times(path, len(files), sel), len(files), sel)


def folder_times(path: Path, n: int, sel: FrameSelection) -> list[float] | None:
    """The times of a frame folder's ``n`` frames where ``sel`` samples by rate (``--fps``), from
    ``--folder-fps``, which it then needs; None where it does not sample by rate."""
    if sel.fps is None:
        return None
    if sel.folder_fps is None:
        raise ConfigError(f"--fps needs the frame rate of frame folders such as {path}: add --folder-fps "
                          "(the rate the frames were extracted at, e.g. 30 for HMDB51, 25 for UCF101)")
    return [i / sel.folder_fps for i in range(n)]


def _folder_batches(files: Sequence[Path], chosen: Sequence[int], n: int) -> Iterator[DecodedBatch]:
    """Runs of up to ``n`` selected frames. JPEGs of one size decode straight into one (k, H, W, 3)
    buffer, which ``preprocess.resize_frames`` then resizes in one call: per frame that saves an
    allocation, a copy and the per-call overhead, about a fifth of the decoding time (measured:
    0.49 vs 0.60 ms per 320x240 frame, decode + resize, one thread). Any other frame (another
    size, a PNG, a file simplejpeg does not take) ends the run and comes alone; a broken one comes
    as its error, in its place."""
    run: list[int] = []
    buf: np.ndarray | None = None

    def ended() -> DecodedBatch:  # the run so far, as a batch
        return DecodedBatch(run, torch.from_numpy(buf[:len(run)]).permute(0, 3, 1, 2), None)

    for left, i in zip(range(len(chosen), 0, -1), chosen):
        try:
            data, error = _read_frame(files[i]), None
        except FrameDecodeError as e:
            data, error = None, str(e)
        size = None if data is None else _turbo_size(data)
        if run and size != buf.shape[1:3]:  # another size, or a frame that comes alone
            yield ended()
            run = []
        if size is not None:
            if not run:
                buf = np.empty((min(n, left), *size, 3), np.uint8)
            if _turbo_into(data, buf[len(run)]):
                run.append(i)
                if len(run) == len(buf):
                    yield ended()
                    run = []
                continue
            if run:  # damaged: the run ends before it
                yield ended()
                run = []
        if data is None:
            yield DecodedBatch([i], None, error)
            continue
        try:
            yield DecodedBatch([i], _decode_frame(data, files[i], turbo=False)[None], None)
        except FrameDecodeError as e:
            yield DecodedBatch([i], None, str(e))
    if run:
        yield ended()


def iter_frame_batches(video_path: Path, kind: str, sel: FrameSelection, n: int) -> Iterator[DecodedBatch]:
    """The selected frames of a video, decoded, in batches of up to ``n``: a frame folder's in runs
    (``_folder_batches``), a video file's one at a time, as PyAV decodes each into its own array.
    A broken frame comes as its error, not a stop."""
    if kind == "frames":
        files, chosen = _folder_selection(video_path, sel)
        yield from _folder_batches(files, chosen, n)
        return
    for f in iter_video_file(video_path, sel):
        yield DecodedBatch([f.index], None if f.frame is None else _as_batch(f.frame), f.error, f.skipped)


def _as_batch(frame: torch.Tensor) -> torch.Tensor:
    """(3, H, W) → (1, 3, H, W), keeping (H, W, 3) memory recognisable as channels_last: a plain
    ``frame[None]`` would give the batch a stride of 3."""
    x = nhwc_view(frame)
    return frame[None] if x is None else x


def source_fps(video_path: Path, kind: str, sel: FrameSelection) -> float | None:
    """Frame rate of the source: the stream's for video files, ``folder_fps`` for frame folders."""
    if kind == "frames":
        return sel.folder_fps
    return video_fps(video_path)


def selected_positions(video_path: Path, kind: str, sel: FrameSelection) -> list[int]:
    """Source frame indices a cache with selection ``sel`` holds for this video, without decoding."""
    if kind == "frames":
        n = len(list_frames(video_path))
        return apply_selection(folder_times(video_path, n, sel), n, sel)
    pts, tb = _video_pts(video_path)
    if pts is None:
        raise VideoDecodeError(f"{video_path}: no frame timestamps")
    return apply_selection(_seconds(pts, tb), len(pts), sel, tb)


def read_frames(video_path: Path, kind: str, indices: Sequence[int]) -> list[torch.Tensor]:
    """Decode the given source frames (sorted, may repeat) as (3, H, W) uint8, in the given order."""
    want = sorted(set(indices))
    got: dict[int, torch.Tensor] = {}
    if kind == "frames":
        files = list_frames(video_path)
        for i in want:
            got[i] = decode_image_file(files[i])
    else:
        sel = FrameSelection(max_frames=None)
        keep = set(want)
        for f in iter_video_file(video_path, sel):
            if f.frame is not None and f.index in keep:
                got[f.index] = f.frame
            if f.index >= want[-1]:
                break
        missing = keep - set(got)
        if missing:
            raise VideoDecodeError(f"{video_path}: frame {min(missing)} could not be decoded")
    return [got[i] for i in indices]


# ------------------------------------------------------------------------- validation carve

# UCF101: v_<Class>_g<group>_c<clip>; the group (one actor / source) is what must not straddle.
_UCF_NAME = re.compile(r"^(?P<group>v_.+_g\d+)_c\d+$")
# HMDB51: <source video>_<action>_<body>_<camera motion>_<people>_<view>_<quality>_<clip number>,
# e.g. April_09_brush_hair_u_nm_np1_ba_goo_0. The tags are each clip's own (one source's clips can
# differ in body part, camera motion, view or quality), so the group is what precedes them: the
# source video and the action. The action stays in: groups spanning classes would let the carve,
# which holds a group out whole, take every clip of a class that shares its source with another.
_HMDB_NAME = re.compile(r"^(?P<group>.+)_[a-z]_(?:nm|cm)_np\d+_(?:fr|ba|le|ri)_(?:goo|med|bad)_\d+$")


def _clip_name(rel: str) -> str:
    """A clip's name as group patterns see it: the file name without a video extension."""
    name = Path(rel).name
    return Path(name).stem if Path(name).suffix.lower() in VIDEO_EXTS else name


def source_group(rel: str, pattern: str | re.Pattern | None = None) -> str:
    """The source video a clip comes from, from its name: ``pattern`` (a regex searched in the file
    name without its extension; its first group, else the whole match), else the UCF101 or HMDB51
    naming, else the clip itself (one group per video: its whole relative path, since the same
    file name in several class folders, ``walk/0001.mp4`` and ``run/0001.mp4``, is several videos)."""
    stem = _clip_name(rel)
    if pattern is not None:
        m = re.search(pattern, stem)
        if m:
            return m.group(1) if m.groups() else m.group(0)
        return rel
    m = _UCF_NAME.match(stem) or _HMDB_NAME.match(stem)
    return m["group"] if m else rel


def uncarvable(where: str) -> str:
    """Why ``carve_validation`` held nothing out of ``where``: a class keeps its last source group
    for training, so only classes of one source video each leave nothing to hold out."""
    return (f"cannot carve a validation set from {where}: each class's videos come from one source video (as "
            "--group-pattern, or else the UCF101/HMDB51 names, group them), and a source is held out whole; give a "
            "split with --val-split, or a --group-pattern that tells the sources apart")


def carve_validation(videos: Sequence[str], labels: Sequence[int], fraction: float, *, seed: int = 0,
                     pattern: str | None = None) -> np.ndarray:
    """A boolean mask of the videos to hold out for validation: about ``fraction`` of each class,
    taken as whole source groups (``source_group``), so clips of one source video never land on
    both sides. Deterministic for a seed. A class whose videos are all one group stays in training."""
    if not 0 < fraction < 1:
        raise ConfigError(f"--val-fraction must be between 0 and 1, got {fraction}")
    labels = np.asarray(labels)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, v in enumerate(videos):
        groups[source_group(v, pattern)].append(i)
    if pattern is not None and videos and not any(re.search(pattern, _clip_name(v)) for v in videos):
        log.warning("--group-pattern '%s' matches none of the %d video names: each video is its own source group",
                    pattern, len(videos))
    # A group goes with the class most of its clips have (UCF101's groups are per class; an
    # HMDB51 source can hold several actions).
    by_class: dict[int, list[str]] = defaultdict(list)
    for g, idx in groups.items():
        by_class[int(np.bincount(labels[idx]).argmax())].append(g)
    rng = np.random.default_rng(seed)
    val = np.zeros(len(videos), dtype=bool)
    for c in sorted(by_class):
        names = sorted(by_class[c])
        rng.shuffle(names)
        total = sum(len(groups[g]) for g in names)
        target = max(1, round(fraction * total))
        taken = 0
        for g in names[:-1]:  # never the last group: the class keeps training videos
            if taken >= target:
                break
            val[groups[g]] = True
            taken += len(groups[g])
    return val
