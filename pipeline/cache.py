"""The feature cache: the only module that knows HDF5.

Layout of ``<name>.h5`` (schema version 2), readable with plain h5py::

    /                       attrs: schema_version, classes (JSON list), provenance (JSON), config (JSON),
                                   failures (JSON list), package_version, created
    /<split>/features       (sum T, D) float16|float32      row r = one kept frame (D: the backbone's)
    /<split>/frame_indices  (sum T,) int64                  source frame number of row r
    /<split>/offsets        (N + 1,) int64                  video i = rows offsets[i]:offsets[i+1]
    /<split>/labels         (N,) int64                      index into classes
    /<split>/videos         (N,) str                        path relative to the dataset root
    /<split>/fps            (N,) float32                    source frame rate (NaN if unknown)
    /<split>/sources        (N,) str                        what each video was extracted from
    /<split>/checksums      (N,) uint32                     CRC-32 of each video's rows, then its frame indices

``features`` and ``frame_indices`` are stored contiguously (no chunking, no compression): row r of
``features`` is at byte ``dset.id.get_offset() + r * D * itemsize`` of the file, so a lazy reader
(``FeatureCache.open_lazy``) fetches exactly the rows a batch samples with plain positional reads.
Caches written before this layout hold them chunked; every reader still reads them (the lazy one
chunk by chunk, with a warning), and ``rewrite_cache`` rewrites them contiguously.

Crash safety. HDF5 is not safe to kill mid-write, so the cache file is never written in place.
While extracting, every finished video is saved as its own small file in ``<name>.h5.partial/``
(written to a temporary name, then atomically renamed); a kill at any instant loses at most the
videos in flight. When all videos are done, the cache is assembled into ``<name>.h5.tmp`` (the
existing cache's videos plus the new ones, in dataset order) and atomically renamed over
``<name>.h5``. So a rerun resumes exactly, and the result is identical to an uninterrupted run.

Damage. HDF5 checks nothing in raw data, so a changed byte in ``features`` (a bad sector, a
stray write) would read as a slightly different number. Each video's rows carry a CRC-32,
checked wherever a whole video is read: loading a split into memory, ``FeatureCache.video``, and
carrying a video into a rebuilt cache, and for a split read lazily, by a streaming pass before the
run starts (``FeatureCache.verify``; a bare ``LazySplit`` checks a video when a read first touches it). Caches written before the checksums lack the dataset and are read unchecked, as before.

Schema 1 (before backbones were a choice) is read as it is: its provenance is MobileNetV2 with a
FrameSpec whose short side equals its crop (``config.Provenance.from_dict`` migrates it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import hashlib
import io
import itertools
import json
import logging
import mmap
import os
import sys
import tempfile
import time
import weakref
import zlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import FrameSpec, Provenance
from .errors import CacheError, ConfigError, PipelineError
from .files import (atomic_path, atomic_write_bytes, ensure_dir, exclusive, is_disk_full, not_regular, remove_removing,
                    remove_stale_tmp, remove_tree)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the provenance names the backbone; FrameSpec has resize size and interpolation
# Failures found by indexing (a name that is not UTF-8, an unreadable folder, a video a split file
# lists that is not on disk), not by decoding: a rerun finds them afresh, and retrying a video for
# them would redo it on every run, for nothing.
INDEX_FAILURES = frozenset({"name", "folder", "missing"})


def _h5py():
    import h5py

    return h5py


def is_hdf5(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file (a cache, or a damaged one); False for a checkpoint, text, or
    anything that is not a regular file (a FIFO would block the read)."""
    return Path(path).is_file() and bool(_h5py().is_hdf5(str(path)))


def _raised_in_h5py(e: BaseException) -> bool:
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "h5py" in last.tb_frame.f_code.co_filename


@contextlib.contextmanager
def _reading(path: str | Path) -> Iterator[None]:
    """An error h5py raises while reading ``path`` as one CacheError line: a cache damaged inside (its
    metadata or index overwritten; a truncated one is told on opening) fails every command that
    reads it, and deep in HDF5, with a traceback otherwise."""
    try:
        yield
    except PipelineError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        # h5py's errors, and the JSON of an attribute whose bytes were overwritten
        if not (_raised_in_h5py(e) or isinstance(e, (json.JSONDecodeError, UnicodeDecodeError))) or is_disk_full(e):
            raise
        why = (str(e).splitlines() or [type(e).__name__])[0].strip("\"' ")
        raise CacheError(f"cannot read feature cache {path} ({why}): the file is damaged; re-extract it with "
                         "--overwrite") from e


def _reads(method):
    """``_reading(self.path)`` around a method of an object that reads a cache file."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with _reading(getattr(self, "path", None) or (args[0] if args else "?")):
            return method(self, *args, **kwargs)
    return wrapper


def video_checksum(features: np.ndarray, frame_indices: np.ndarray) -> int:
    """CRC-32 of a video's stored feature rows (in the cache's dtype) and then its int64 frame
    indices: what ``/<split>/checksums`` holds."""
    crc = zlib.crc32(np.ascontiguousarray(features))
    return zlib.crc32(np.ascontiguousarray(frame_indices, dtype=np.int64), crc)


def _damaged_video(path: str | Path, split: str, rel: str) -> CacheError:
    return CacheError(f"{path}: the features of {rel} (split {split!r}) do not match their checksum: the file is "
                      "damaged; re-extract it with --overwrite")


def _video_rows(path: str | Path, g: Any, i: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Features and frame indices of video ``i`` (rows ``a:b``) of the split group ``g``, checked
    against its checksum where the cache has them."""
    feats, frames = g["features"][a:b], g["frame_indices"][a:b]
    if "checksums" in g and video_checksum(feats, frames) != int(g["checksums"][i]):
        raise _damaged_video(path, g.name.strip("/"), _strings(g["videos"][i:i + 1])[0])
    return feats, frames


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True)


@dataclass(frozen=True)
class VideoRecord:
    """One extracted video, as held in a part file or read back from the cache."""

    rel: str
    label: int
    features: np.ndarray  # (T, D)
    frame_indices: np.ndarray  # (T,)
    fps: float
    broken_frames: int = 0  # frames that failed to decode; such a video is retried on a rerun
    source: str = ""  # ``data.source_signature`` of the video when extracted ('' unknown): a changed one is redone


def read_partial(path: str | Path) -> dict[str, Any] | None:
    """``{"provenance", "replace"}`` of an unfinished extraction into ``path``, if there is one."""
    meta = Path(f"{path}.partial") / "meta.json"
    if not meta.exists():
        return None
    try:
        d = json.loads(meta.read_text())
        return {"provenance": Provenance.from_dict(d["provenance"]), "replace": bool(d["replace"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CacheError(f"unreadable {meta} ({e}); delete {meta.parent} to start over") from e


def remove_leftovers(path: str | Path) -> None:
    """What interrupted writers of the cache ``path`` left: its temporary file, work folders renamed
    aside for removal (``files.remove_tree``) and the temporary files of unfinished parts. Only
    under ``exclusive(path)``: no writer is running then."""
    remove_stale_tmp(path)
    partial = Path(f"{path}.partial")
    remove_removing(partial)
    for tmp in partial.glob("*/*.npz.tmp") if partial.is_dir() else ():
        if tmp.is_file() and not tmp.is_symlink():
            with contextlib.suppress(OSError):
                tmp.unlink()


def _finished_parts(partial: Path) -> int:
    """Finished videos an unfinished extraction keeps in its ``partial`` folder."""
    return sum(1 for _ in partial.glob("*/*.npz")) if partial.is_dir() else 0


def extraction_hint(path: str | Path) -> str:
    """What an interrupted extraction into ``path`` kept and how to go on, as it is now."""
    done = _finished_parts(Path(f"{path}.partial"))
    if not done:
        return "no video was finished yet; rerun the same command to start again"
    return f"{done} finished video(s) are kept in {path}.partial; rerun the same command to resume"


def _stored_videos(path: Path, parts: bool = True) -> dict[str, list[str]]:
    """Relative paths of the videos, per split, that assembling ``path`` would start from: the cache
    file's (unless an unfinished run replaces it) and (``parts``) the unfinished run's finished parts."""
    out: dict[str, list[str]] = {}
    partial = read_partial(path)
    if path.is_file() and not (partial and partial["replace"]):
        with _open(path) as f, _reading(path):
            for split in f:
                out[split] = _strings(f[split]["videos"][()])
    for p in sorted(Path(f"{path}.partial").glob("*/*.npz")) if partial and parts else ():
        try:
            with np.load(p) as z:
                out.setdefault(p.parent.name, []).append(str(z["rel"]))
        except Exception:  # noqa: BLE001 - a torn part: the writer discards and redoes it
            continue
    return out


class CacheWriter:
    """Collect finished videos crash-safely and assemble them into the cache file.

    ``provenance`` holds what must match for features to be mixed in one file: backbone, weights
    identity, FrameSpec, frame selection, compute precision, dtype and class list.

    ``replace=True`` (``--overwrite``) ignores the existing cache file, which stays intact until
    the new one atomically takes its place; an unfinished replacing run resumes like any other.
    """

    def __init__(self, path: str | Path, provenance: Provenance, *, replace: bool = False) -> None:
        self.path = Path(path)
        self.partial = Path(f"{self.path}.partial")
        if self.partial.exists() and not self.partial.is_dir():
            raise CacheError(f"{self.partial} is not a folder, but an extraction into {self.path} keeps its finished "
                             "videos there; move it away and rerun")
        self.provenance = provenance
        self._made: set[str] = set()  # splits whose part folder exists
        # (split, rel) → the source signature to store for a video kept as it is (a record of an
        # earlier version, checked to hold what this one would extract: ``extract``)
        self.resign: dict[tuple[str, str], str] = {}
        self.check(self.path, provenance, replace=replace)
        partial = read_partial(self.path)
        if partial is not None and partial["provenance"].mismatch(provenance, dated=True):  # only with replace (checked)
            remove_tree(self.partial)  # unfinished work with other settings, being replaced
            partial = None
        elif partial is None and (n := _finished_parts(self.partial)):
            # Parts with no meta.json to say what made them (removed by hand, or by a removal older
            # versions did in place and were stopped in): their settings are unknown, so they are
            # redone rather than mixed into a cache of these settings.
            log.warning("discarding %d finished video(s) in %s: its meta.json, which records the settings they were "
                        "extracted with, is missing; they are extracted again", n, self.partial)
            remove_tree(self.partial)
        self.replace = replace or bool(partial and partial["replace"])
        if partial is None or partial["replace"] != self.replace:
            self.partial.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.partial / "meta.json",
                               _json({"provenance": provenance.to_dict(), "replace": self.replace}).encode())

    @staticmethod
    def check(path: str | Path, provenance: Provenance, *, replace: bool = False, ignore: tuple[str, ...] = ()) -> None:
        """Raise the CacheError that ``CacheWriter(path, provenance, replace=replace)`` would raise,
        without writing anything. ``ignore``: provenance fields not known yet (the weights of a
        backbone still to be calibrated), so that a caller can refuse before its costly work."""
        if replace:
            return
        path = Path(path)
        partial = read_partial(path)
        work = Path(f"{path}.partial")
        if partial is not None:
            diff = partial["provenance"].mismatch(provenance, ignore=ignore, dated=True)
            if diff:
                keep = f" (and keep {path} as it is)" if path.exists() else ""
                raise CacheError(f"{work} was made with different settings ({diff}): an unfinished extraction"
                                 f"{' replacing ' + str(path) if partial['replace'] and path.exists() else ''}; "
                                 f"delete {work} to drop it{keep}, use another --output, or --overwrite to replace it")
        if path.exists():
            replacing = bool(partial and partial["replace"])
            try:
                diff = read_provenance(path).mismatch(provenance, ignore=ignore, dated=True)
            except CacheError as e:  # not a cache of this version: only --overwrite replaces it
                if not replacing:
                    raise
                diff = str(e)
            if diff and replacing:  # resumed, it would replace the file: only with --overwrite
                raise CacheError(f"{work} is an unfinished --overwrite of {path}, which was made with different "
                                 f"settings ({diff}); rerun with --overwrite to finish replacing it, or delete {work} "
                                 f"to keep {path}")
            if diff:
                raise CacheError(f"{path} was made with different settings ({diff}); use another --output, "
                                 "or --overwrite to replace it")

    @staticmethod
    def check_kept(path: str | Path, selected: Collection[str], keep: dict[str, Collection[str]], *,
                   replace: bool = False) -> None:
        """Refuse a run that writes only the ``selected`` splits (``--splits``) when a split it would
        keep as it is holds a video the dataset no longer has there: moved to another split,
        deleted, or another split definition. The cache would mix two versions of the dataset, at
        worst one video in both train and test. ``keep``: every split left out that is on disk,
        with the relative paths of its videos now. Checks the cache file: an unfinished run's parts
        of a split left out are not written (``finalize``)."""
        if replace:
            return
        for split, held in _stored_videos(Path(path), parts=False).items():
            if split in selected or split not in keep:  # written, or no longer on disk: dropped
                continue
            now = keep[split]
            stale = [r for r in held if r not in now]
            if stale:
                raise CacheError(
                    f"{path}: split {split!r}, which --splits leaves as it is, holds {len(stale)} video(s) the "
                    f"dataset no longer has in it (e.g. {stale[0]!r}: moved, deleted, or another split "
                    "definition); rerun without --splits to bring every split up to date, or use --overwrite")

    # -- parts ---------------------------------------------------------------------------------

    def _part_path(self, split: str, rel: str) -> Path:
        return self.partial / split / (hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".npz")

    @_reads
    def done(self, split: str) -> dict[str, str]:
        """Videos already stored, in the cache file or as finished parts: relative path → the
        source signature they were extracted from ('' where not recorded: older caches).

        Videos stored with broken frames are not counted: a rerun retries them, so a repaired
        frame gets in."""
        done: dict[str, str] = {}
        if self.path.exists() and not self.replace:
            with _open(self.path) as f:
                if split in f:
                    g = f[split]
                    retry = {x["video"] for x in json.loads(f.attrs.get("failures", "[]"))
                             if x.get("split") == split and x.get("skipped") not in INDEX_FAILURES}
                    videos = _strings(g["videos"][()])
                    sources = _strings(g["sources"][()]) if "sources" in g else [""] * len(videos)
                    done.update((v, src) for v, src in zip(videos, sources) if v not in retry)
        d = self.partial / split
        if d.is_dir():
            for p in d.glob("*.npz"):
                try:
                    with np.load(p) as z:
                        for k in z.files:  # every member read whole: zipfile checks its CRC, so torn bytes show
                            z[k]
                        if int(z["broken"]) == 0:
                            done[str(z["rel"])] = str(z["source"]) if "source" in z.files else ""
                except Exception:  # noqa: BLE001 - a part torn by a power cut: redo that video
                    log.warning("discarding unreadable part %s", p)
                    p.unlink(missing_ok=True)
        return done

    def add(self, split: str, rec: VideoRecord) -> None:
        """Store one finished video; atomic, so a kill leaves either all of it or nothing.

        It runs between forward passes, so it is kept to four system calls: the part is put
        together in memory and written at once (``np.savez`` on a file makes dozens of small
        writes and seeks), and each split's folder is made once. Measured during an extraction
        here, that took a part from about 11 ms to 4-5."""
        if rec.features.ndim != 2 or rec.features.shape[1] != self.provenance.feature_dim:
            raise CacheError(f"the features of {rec.rel} are of shape {tuple(rec.features.shape)}, not (frames, "
                             f"{self.provenance.feature_dim}) as {self.provenance.backbone} was said to give: nothing "
                             f"of them was stored, {self.path} is as it was; please report this")
        p = self._part_path(split, rec.rel)
        if split not in self._made:
            p.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(split)
        buf = io.BytesIO()
        np.savez(buf, rel=np.array(rec.rel), label=np.int64(rec.label), features=rec.features,
                 frame_indices=rec.frame_indices.astype(np.int64), fps=np.float32(rec.fps),
                 broken=np.int64(rec.broken_frames), source=np.array(rec.source))
        # No fsync: done() checks every part it finds, and a part torn by a power cut is redone.
        # A buffered file: its write() goes on after a short write and raises on a full disk, where
        # a raw one would return a count and leave a torn part to be renamed into place.
        with atomic_path(p, hint=self._kept_hint, fsync=False) as tmp, open(tmp, "wb") as f:
            f.write(buf.getbuffer())

    def _kept_hint(self) -> str:
        return f"{_finished_parts(self.partial)} finished video(s) are kept in {self.partial}"

    def stored(self) -> dict[str, list[str]]:
        """Relative paths of the videos, per split, that ``finalize`` starts from (the cache file's
        unless this run replaces it, and the finished parts)."""
        return _stored_videos(self.path)

    def pending(self, keep: Collection[str] = ()) -> bool:
        """Finished parts not yet in the cache file (of splits not in ``keep``)."""
        return self.partial.is_dir() and any(p.parent.name not in keep for p in self.partial.glob("*/*.npz"))

    @_reads
    def unchanged(self, failures: list[dict[str, Any]], order: dict[str, Sequence[str]],
                  keep: Collection[str] = ()) -> bool:
        """``finalize(order, ..., keep=keep)`` would write the cache file as it is: no new parts,
        no video or split to drop or reorder, and the same failures."""
        if self.replace or not self.path.exists() or self.pending(keep) or self.resign:
            return False
        with _open(self.path) as f:
            for split in set(f.keys()) | set(order):
                if split in keep:
                    continue
                if split not in order or split not in f:
                    return False  # a split to drop, or one to write (empty: all its videos failed)
                cached = _strings(f[split]["videos"][()])
                if cached != _ranked(order[split], set(cached)):  # a stale video, or another order
                    return False
            old = json.loads(f.attrs.get("failures", "[]"))
        return _merge_failures(old, failures, keep) == old

    def close_unchanged(self, keep: Collection[str] = ()) -> None:
        """Nothing new to write: drop the work folder, keep the cache file as it is."""
        self._drop_parts(keep)

    def _drop_parts(self, keep: Collection[str]) -> None:
        """Remove the work folder, except the finished parts of the splits in ``keep``: a run that
        ``--splits`` leaves a split out of does not write them (an interrupted run's few videos
        would stand as the whole split) but keeps them for the run that extracts that split. Its
        meta then builds on the cache file, not on one being replaced."""
        kept = {p.parent.name for p in self.partial.glob("*/*.npz")} & set(keep) if self.partial.is_dir() else set()
        if not kept:  # the cache file is written: what cannot be deleted stays, as before
            remove_tree(self.partial, strict=False)
            return
        for d in self.partial.iterdir():
            if d.is_dir() and d.name not in kept:
                remove_tree(d, aside=self.partial, strict=False)  # renamed out of the work folder, not to a split
        if self.replace and self.path.exists():
            atomic_write_bytes(self.partial / "meta.json",
                               _json({"provenance": self.provenance.to_dict(), "replace": False}).encode())

    @_reads
    def stored_indices(self, split: str) -> dict[str, np.ndarray]:
        """The source frame indices stored for each video of ``split`` (cache file and finished
        parts), as ``done`` lists them."""
        out: dict[str, np.ndarray] = {}
        if self.path.exists() and not self.replace:
            with _open(self.path) as f:
                if split in f:
                    g = f[split]
                    offs, frames = g["offsets"][()], g["frame_indices"][()]
                    for i, rel in enumerate(_strings(g["videos"][()])):
                        out[rel] = frames[offs[i]:offs[i + 1]]
        for rel, (p, _) in self._parts(split).items():
            with np.load(p) as z:
                out[rel] = z["frame_indices"]
        return out

    def _parts(self, split: str) -> dict[str, tuple[Path, int]]:
        """Finished parts of ``split``: relative path -> (part file, rows)."""
        d = self.partial / split
        out = {}
        for p in sorted(d.glob("*.npz")) if d.is_dir() else []:
            with np.load(p) as z:
                out[str(z["rel"])] = (p, len(z["frame_indices"]))
        return out

    # -- assembly ------------------------------------------------------------------------------

    def finalize(self, order: dict[str, Sequence[str]], attrs: dict[str, Any], keep: Collection[str] = ()) -> Path:
        """Write the cache: existing videos + finished parts. Each split in ``order`` holds exactly
        its videos there that are stored, in that order (the dataset's); the splits in ``keep``
        stay as they are in the cache file (their failures too; their parts are kept for later,
        ``_drop_parts``); any other split is dropped, with a warning."""
        old = _open(self.path) if self.path.exists() and not self.replace else None
        hint = self._kept_hint()
        try:
            # An upper bound of the new file's size: the parts hold the same rows with more overhead.
            need = sum(p.stat().st_size for p in self.partial.glob("*/*.npz")) if self.partial.is_dir() else 0
            need += self.path.stat().st_size if old is not None else 0
            old_splits = set(old.keys()) if old is not None else set()
            part_splits = {p.name for p in self.partial.iterdir() if p.is_dir()} if self.partial.exists() else set()
            failures = _merge_failures(json.loads(old.attrs.get("failures", "[]")) if old else [],
                                       attrs.pop("failures", []), keep)
            with atomic_path(self.path, hint=hint) as tmp, _h5_errors(), _h5_reserved(tmp, need) as out:
                for split in sorted(old_splits | part_splits | set(order)):
                    sources: dict[str, Any] = {}  # rel -> (kind, ..., rows)
                    if old is not None and split in old:
                        g = old[split]
                        offs = g["offsets"][()]
                        for i, rel in enumerate(_strings(g["videos"][()])):
                            sources[rel] = ("old", g, i, offs, int(offs[i + 1] - offs[i]))
                    if split in keep and split not in order:  # as the cache file has it (its parts wait)
                        if not sources:
                            continue
                        ranked = list(sources)
                    else:
                        for rel, (p, rows) in self._parts(split).items():
                            sources[rel] = ("part", p, rows)
                        if split not in order:
                            log.warning("dropped split %r of the cache (%d video(s)): the dataset has no such split "
                                        "now", split, len(sources))
                            continue
                        ranked = _ranked(order[split], sources)  # the split as indexed now: no stale video
                        stale = len(sources) - len(ranked)
                        if stale:
                            log.warning("dropped %d cached video(s) of split %r that are no longer in it "
                                        "(moved, deleted, or another split definition)", stale, split)
                    _write_split(out, split, (self._record(sources[r], r, split) for r in ranked),
                                 sum(sources[r][-1] for r in ranked), self.provenance.dtype,
                                 self.provenance.feature_dim)
                _write_root_attrs(out, self.provenance, {**attrs, "failures": _json(failures)})
                out.flush()  # write errors surface here, not in a destructor
        finally:
            if old is not None:
                old.close()
        self._drop_parts(keep)
        return self.path

    def _record(self, src: tuple, rel: str, split: str) -> VideoRecord:
        if src[0] == "old":  # a video of the cache file, carried into the new one: checked first
            _, g, i, offs, _ = src
            a, b = int(offs[i]), int(offs[i + 1])
            source = _strings(g["sources"][i:i + 1])[0] if "sources" in g else ""
            feats, frames = _video_rows(self.path, g, i, a, b)
            return VideoRecord(rel, int(g["labels"][i]), feats, frames, float(g["fps"][i]),
                               source=self.resign.get((split, rel), source))
        with np.load(src[1]) as z:
            source = str(z["source"]) if "source" in z.files else ""
            return VideoRecord(rel, int(z["label"]), z["features"], z["frame_indices"], float(z["fps"]),
                               source=self.resign.get((split, rel), source))


def write_cache(path: str | Path, provenance: Provenance, splits: dict[str, Iterable[VideoRecord]],
                attrs: dict[str, Any] | None = None) -> Path:
    """Write a whole cache in one go (synthetic caches, merges): temporary file, then atomic rename.

    The contiguous layout needs each split's row count before the first row is written: a list of
    records gives it at once; an iterator is first spooled (in memory up to ``SPOOL_BYTES``, then
    in an anonymous temporary file beside ``path``), so a cache larger than RAM can be streamed."""
    path = Path(path)
    dtype = np.dtype(provenance.dtype)
    with contextlib.ExitStack() as stack:
        staged = {split: _stage(records, dtype, stack, path.parent) for split, records in splits.items()}
        need = sum(rows * (dim * dtype.itemsize + 8) for rows, dim, _ in staged.values())
        with atomic_path(path) as tmp, _h5_errors(), _h5_reserved(tmp, need) as out:
            for split, (rows, _, records) in staged.items():
                _write_split(out, split, records, rows, provenance.dtype, provenance.feature_dim)
            _write_root_attrs(out, provenance, {"failures": "[]", **(attrs or {})})
            out.flush()
    return path


@dataclass(frozen=True)
class RewriteResult:
    path: Path
    layouts: dict[str, str]  # split -> layout of its features before
    rewritten: bool
    nbytes: int
    seconds: float


def rewrite_cache(path: str | Path, output: str | Path | None = None, *, force: bool = False,
                  block_bytes: int = 64 << 20) -> RewriteResult:
    """Rewrite a cache in the contiguous layout lazy reading wants (see the module docstring): the
    same datasets, values and attributes, through a temporary file and an atomic rename, over
    ``path`` or into ``output``. A cache that is contiguous already is left alone unless ``force``
    (or an ``output`` is given)."""
    src = Path(path)
    dst = Path(output) if output is not None else src
    _check_cache_path(src)
    if dst.resolve() != src.resolve() and (dst.exists() or dst.is_symlink()) and not (force and is_hdf5(dst)):
        if force:  # --force replaces an HDF5 file only: never a folder, a checkpoint or notes given by mistake
            what = "a folder" if dst.is_dir() else "not an HDF5 file"
            raise ConfigError(f"--output {dst} exists and is {what}, which --force does not replace; give a new "
                              "file name")
        raise ConfigError(f"--output {dst} exists; give a new file name, or --force to replace it (an HDF5 file only)")
    ensure_dir(dst.parent, "--output folder" if output is not None else "the cache's folder")
    with exclusive(dst, "cache"):  # not while extract-features writes it (the same temporary file)
        remove_stale_tmp(dst)
        return _rewrite(src, dst, force, block_bytes)


def _verify_all(src: Path, block_bytes: int) -> None:
    """A rewrite reads every row: a damaged cache (a video that fails its checksum, offsets that do
    not cut the rows) is said then, not copied and reported written."""
    with FeatureCache(src) as c:
        for split in c.splits:
            c.verify(split, block_bytes)


def _rewrite(src: Path, dst: Path, force: bool, block_bytes: int) -> RewriteResult:
    t0 = time.perf_counter()
    with _open(src) as f, _reading(src):
        _check_schema(f, src)
        layouts = {split: _layout(f[split]["features"]) for split in f}
    if not force and dst == src and all(v == "contiguous" for v in layouts.values()):
        return RewriteResult(dst, layouts, False, 0, time.perf_counter() - t0)
    _verify_all(src, block_bytes)
    hint = f"{src} is unchanged"
    with atomic_path(dst, hint=hint) as tmp, _h5_errors():
        with _open(src) as old, _h5_reserved(tmp, src.stat().st_size) as out, _reading(src):
            for split in old:
                g, h = old[split], out.create_group(split)
                h.attrs.update(g.attrs)
                for name, ds in g.items():
                    if name in ("features", "frame_indices"):
                        _copy_contiguous(ds, h, name, block_bytes)
                    else:
                        old.copy(ds, h, name=name)
            out.attrs.update(old.attrs)
            out.flush()
    return RewriteResult(dst, layouts, True, dst.stat().st_size, time.perf_counter() - t0)


def _copy_contiguous(ds: Any, group: Any, name: str, block_bytes: int) -> None:
    new = group.create_dataset(name, shape=ds.shape, dtype=ds.dtype, fill_time="never")
    new.attrs.update(ds.attrs)
    per_row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize)
    step = max(1, block_bytes // per_row)
    buf = np.empty((min(step, ds.shape[0]), *ds.shape[1:]), ds.dtype)
    for a in range(0, ds.shape[0], step):
        b = min(a + step, ds.shape[0])
        ds.read_direct(buf, np.s_[a:b], np.s_[0:b - a])
        new[a:b] = buf[:b - a]


SPOOL_BYTES = 256 << 20


def _stage(records: Iterable[VideoRecord], dtype: np.dtype, stack: contextlib.ExitStack,
           folder: Path) -> tuple[int, int, Iterable[VideoRecord]]:
    """(rows, dim or 0, records to write): a sequence as it is, an iterator through a spool."""
    if isinstance(records, Sequence):
        dim = records[0].features.shape[1] if len(records) else 0
        return sum(len(r.frame_indices) for r in records), dim, records
    spool = stack.enter_context(tempfile.SpooledTemporaryFile(SPOOL_BYTES, dir=folder if folder.is_dir() else None))
    meta, rows, dim = [], 0, 0
    for rec in records:
        feats = np.ascontiguousarray(rec.features, dtype=dtype)  # (T, D)
        spool.write(feats.data)
        meta.append((rec.rel, rec.label, feats.shape, np.asarray(rec.frame_indices), rec.fps))
        rows, dim = rows + feats.shape[0], feats.shape[1]

    def replay() -> Iterator[VideoRecord]:
        spool.seek(0)
        for rel, label, shape, frames, fps in meta:
            feats = np.frombuffer(spool.read(shape[0] * shape[1] * dtype.itemsize), dtype=dtype).reshape(shape)
            yield VideoRecord(rel, label, feats, frames, fps)

    return rows, dim, replay()


@contextlib.contextmanager
def _h5_errors() -> Iterator[None]:
    """Raise what HDF5 could only report from a destructor. When a write fails while h5py closes
    or frees an object (a full disk at the final chunk flush), the error goes to
    ``sys.unraisablehook`` and the file would look written; here it becomes an exception."""
    seen: list[BaseException] = []
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value) if u.exc_value is not None else None
    try:
        yield
    finally:
        sys.unraisablehook = previous
    if seen:
        raise seen[0]


@contextlib.contextmanager
def _h5_reserved(path: Path, nbytes: int) -> Iterator[Any]:
    """A new HDF5 file opened for writing, with ``nbytes`` (plus 5 % and 1 MiB for metadata) of disk
    reserved first. libhdf5 cannot recover from a write that fails for lack of space (the error
    comes from a destructor, then the process may crash: h5py issue #914), so a full disk must fail
    here, in ``posix_fallocate``, before HDF5 writes anything. HDF5 writes at its end-of-allocation
    address, inside the reserved blocks, and trims the file to its true size on close."""
    h5py = _h5py()
    h5py.File(path, "w").close()
    if nbytes and hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, int(nbytes * 1.05) + (1 << 20))
    with h5py.File(path, "r+") as out:
        yield out


def _write_root_attrs(out: Any, provenance: Provenance, attrs: dict[str, Any]) -> None:
    """The self-describing root attributes of schema version 1 (see the module docstring)."""
    for k, v in attrs.items():
        out.attrs[k] = v
    out.attrs["schema_version"] = SCHEMA_VERSION
    out.attrs["classes"] = _json(list(provenance.classes))
    out.attrs["provenance"] = _json(provenance.to_dict())
    out.attrs["package_version"] = __version__
    out.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _ranked(listed: Sequence[str], stored: Collection[str]) -> list[str]:
    """A split as ``finalize`` writes it: its stored videos that the dataset lists now, in the
    dataset's order, each once."""
    return list(dict.fromkeys(r for r in listed if r in stored))


def _merge_failures(old: list[dict], new: list[dict], keep: Collection[str]) -> list[dict]:
    """This run's failures, plus the earlier runs' failures in the splits it keeps as they are
    (``keep``), except those found by indexing (every run indexes every split afresh)."""
    return [f for f in old if f.get("split") in keep and f.get("skipped") not in INDEX_FAILURES] + new


def _write_split(out: Any, split: str, records: Iterable[VideoRecord], rows: int, dtype: str, dim: int) -> None:
    """One split, its ``rows`` frames in total, with ``features`` and ``frame_indices`` contiguous
    (see the module docstring). ``dim`` applies only to an empty split; otherwise the records' own."""
    g = out.create_group(split)
    records = iter(records)
    first = next(records, None)
    if first is not None:
        dim = first.features.shape[1]
    # Created at full size with no fill: each byte is written once, by the records below.
    feats = g.create_dataset("features", shape=(rows, dim), dtype=dtype, fill_time="never")
    frames = g.create_dataset("frame_indices", shape=(rows,), dtype="int64", fill_time="never")
    offsets, labels, videos, fps, sources, sums = [0], [], [], [], [], []
    for rec in itertools.chain([first], records) if first is not None else ():
        n, t = offsets[-1], rec.features.shape[0]
        if n + t > rows:
            raise CacheError(f"split {split!r}: the videos hold more than the {rows} frames counted")
        stored, stored_frames = np.asarray(rec.features, dtype=dtype), np.asarray(rec.frame_indices, dtype=np.int64)
        if t:
            feats[n:n + t] = stored
            frames[n:n + t] = stored_frames
        sums.append(video_checksum(stored, stored_frames))  # of the bytes written, as a reader will find them
        offsets.append(n + t)
        labels.append(rec.label)
        videos.append(rec.rel)
        fps.append(rec.fps)
        sources.append(rec.source)
    if offsets[-1] != rows:
        raise CacheError(f"split {split!r}: the videos hold {offsets[-1]} frames, {rows} were counted")
    h5py = _h5py()
    g.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64))
    g.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    g.create_dataset("videos", data=np.asarray(videos, dtype=object), dtype=h5py.string_dtype())
    g.create_dataset("fps", data=np.asarray(fps, dtype=np.float32))
    g.create_dataset("sources", data=np.asarray(sources, dtype=object), dtype=h5py.string_dtype())
    g.create_dataset("checksums", data=np.asarray(sums, dtype=np.uint32))


def _check_cache_path(path: Path) -> None:
    """A CacheError naming what ``path`` is, unless it is a file (a folder, a FIFO or a device, or
    nothing, are not a cache: reading a FIFO would block)."""
    if path.is_dir():
        raise CacheError(f"{path} is a folder; give the feature cache file (.h5) that extract-features wrote")
    if what := not_regular(path):
        raise CacheError(f"{path} is {what}, not a feature cache file; give the .h5 file extract-features wrote")
    if not path.is_file():
        raise CacheError(f"feature cache not found: {path}; run extract-features first")


def _strings(arr: np.ndarray) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in arr]


def _open(path: Path):
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as e:
        if path.is_file() and not is_hdf5(path):  # a checkpoint or another file given by mistake
            raise CacheError(f"{path} is not an HDF5 feature cache; give the .h5 file extract-features wrote") from e
        raise CacheError(f"cannot read feature cache {path}: {e}; re-extract it with --overwrite") from e


def read_provenance(path: str | Path) -> Provenance:
    with _open(Path(path)) as f, _reading(path):
        _check_schema(f, Path(path))
        return Provenance.from_dict(json.loads(f.attrs["provenance"]))


def cached_videos(path: str | Path, split: str) -> list[str]:
    """Relative paths of the videos of ``split`` in the cache file ``path`` ([] if it has no such split)."""
    with _open(Path(path)) as f, _reading(path):
        _check_schema(f, Path(path))
        return _strings(f[split]["videos"][()]) if split in f else []


def _check_schema(f: Any, path: Path) -> None:
    v = f.attrs.get("schema_version")
    if v is None or "provenance" not in f.attrs:
        raise CacheError(f"{path} is not a feature cache written by this tool (no schema_version)")
    if int(v) not in (1, SCHEMA_VERSION):  # schema 1 is read as MobileNetV2 with its FrameSpec
        raise CacheError(
            f"{path} has cache schema version {int(v)}, this tool reads versions 1 to {SCHEMA_VERSION}; "
            "re-extract it with --overwrite"
        )


# ------------------------------------------------------------------------------------- reading


@dataclass
class SplitData:
    """A whole split in memory: ragged features as one array plus offsets."""

    features: np.ndarray  # (sum T, D)
    offsets: np.ndarray  # (N + 1,)
    labels: np.ndarray  # (N,)
    videos: list[str]
    frame_indices: np.ndarray  # (sum T,)
    fps: np.ndarray  # (N,)
    classes: list[str]
    provenance: Provenance

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def feature_dim(self) -> int:
        return self.features.shape[1]

    @property
    def feature_bytes(self) -> int:
        return self.features.nbytes

    def video(self, i: int) -> np.ndarray:
        """(T, D) features of video ``i``."""
        return self.features[self.offsets[i]:self.offsets[i + 1]]


def _layout(ds: Any) -> str:
    """``contiguous`` when row r of ``ds`` sits at a fixed file offset (plain positional reads can
    fetch it), else ``chunked`` (older caches; also compressed, external or never-written data)."""
    if ds.chunks is not None or ds.compression is not None or ds.external or not ds.dtype.isnative:
        return "chunked"
    return "contiguous" if ds.size == 0 or ds.id.get_offset() is not None else "chunked"


def _nonfinite_row(rows: np.ndarray) -> int | None:
    """Index of the first row holding a NaN or Inf (all exponent bits set), or None; integer ops,
    about a millisecond per batch, where a float16 ``isfinite`` would be several."""
    bits = {2: (np.uint16, 0x7C00), 4: (np.uint32, 0x7F800000), 8: (np.uint64, 0x7FF0000000000000)}
    uint, mask = bits[rows.dtype.itemsize]
    bad = ((rows.view(uint) & uint(mask)) == uint(mask)).any(1)
    return int(np.argmax(bad)) if bad.any() else None


def check_finite(block: np.ndarray, rows: np.ndarray, offsets: np.ndarray, videos: list[str], split: str,
                 path: Path | str) -> None:
    """A ``CacheError`` naming the video of the first NaN/Inf in ``block``, the features of the
    split's ``rows``."""
    bad = _nonfinite_row(block)
    if bad is not None:
        vid = int(np.searchsorted(offsets, rows[bad], side="right")) - 1
        raise CacheError(f"NaN/Inf in the features of {videos[vid]} (split {split!r}) in {path}; "
                         "re-extract that cache with --overwrite")


class LazySplit:
    """A split read on demand, for caches larger than RAM: everything but ``features`` is held in
    memory (a few bytes per video); feature rows are read from the file when asked.

    Contiguous features are memory-mapped (read-only) and a batch's rows are copied out with one
    ``np.take``, which runs without the GIL (page faults, on a cold page cache, included), so a
    reader thread hardly competes with the training thread. The pages just read are then dropped
    from the mapping (``MADV_DONTNEED``; they stay in the page cache): a mapped page counts as
    resident memory of the process, and an epoch touches most of the file. So resident memory
    stays at about one batch whatever the cache's size. Chunked (older) caches are read through
    h5py, one whole chunk per chunk touched. Rows are checked for NaN/Inf, and each video against
    its checksum the first time a read touches it (the checksum covers the whole video, so that
    first read goes through all its rows), unless ``checked``: a ``FeatureCache.verify`` pass did
    it already, as stage two's ``open_lazy_bank`` does before a run starts. So damage is found as
    ``load_split`` finds it, whichever way ``--load auto`` chose.

    Besides features, it holds the per-video arrays and, unless ``checked``, the frame indices the
    checksums cover (8 bytes a row).

    It has its own mapping/handle, independent of the ``FeatureCache`` it came from: it stays
    readable after that is closed, until ``close()`` (or garbage collection)."""

    @_reads
    def __init__(self, path: Path, split: str, group: Any, classes: list[str], provenance: Provenance, *,
                 checked: bool = False) -> None:
        ds = group["features"]
        self.path, self.split = path, split
        self.offsets: np.ndarray = group["offsets"][()]
        self.labels: np.ndarray = group["labels"][()]
        self.videos = _strings(group["videos"][()])
        self.fps: np.ndarray = group["fps"][()]
        self.classes, self.provenance = list(classes), provenance
        self.shape: tuple[int, int] = tuple(ds.shape)
        self.dtype = np.dtype(ds.dtype)
        self.layout = _layout(ds)
        self._row_bytes = self.shape[1] * self.dtype.itemsize
        # Checked videos (``_verify``); caches written before the checksums are read unchecked.
        self._sums: np.ndarray | None = group["checksums"][()] if "checksums" in group and not checked else None
        self._frames: np.ndarray | None = group["frame_indices"][()] if self._sums is not None else None
        self._verified = np.zeros(len(self.labels), dtype=bool)
        self._map: mmap.mmap | None = None
        self._h5: Any = None
        if self.layout == "contiguous":
            self._start = int(ds.id.get_offset() or 0)
            if self.feature_bytes:
                with open(path, "rb") as f:
                    if os.fstat(f.fileno()).st_size < self._start + self.feature_bytes:
                        raise CacheError(f"{path} ends before the features of split {split!r} do (truncated "
                                         "copy?); re-extract it with --overwrite")
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        else:
            log.warning("%s: split %r stores its features chunked (an older cache layout): lazy reads fetch "
                        "whole chunks, which is slower; `python cli.py rewrite-cache %s` rewrites it for "
                        "row-wise reads", path, split, path)
            self._h5 = _open(path)
            self._ds = self._h5[split]["features"]
            self._chunk_rows = int(ds.chunks[0]) if ds.chunks else max(1, (1 << 20) // max(self._row_bytes, 1))
            self._buf = np.empty((self._chunk_rows, self.shape[1]), self.dtype)
        self._finalizer = weakref.finalize(self, _close_handles, self._map, self._h5)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def feature_dim(self) -> int:
        return self.shape[1]

    @property
    def feature_bytes(self) -> int:
        return self.shape[0] * self._row_bytes

    @_reads
    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), D) features of ``rows`` (sorted ascending, no repeats), in the stored dtype.
        A NaN/Inf among them is a ``CacheError`` naming the video."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), self.dtype)
        if not len(rows):
            return out
        if rows[0] < 0 or rows[-1] >= self.shape[0] or (len(rows) > 1 and (np.diff(rows) <= 0).any()):
            raise ValueError(f"rows must be sorted, unique and in [0, {self.shape[0]})")
        if self._sums is not None:
            self._verify(rows)
        if self.layout == "contiguous":
            self._read_mapped(rows, out)
        else:
            self._read_chunks(rows, out)
        check_finite(out, rows, self.offsets, self.videos, self.split, self.path)
        return out

    def _verify(self, rows: np.ndarray) -> None:
        """Check each video of ``rows`` not checked yet against its checksum (all its rows)."""
        vids = np.unique(np.searchsorted(self.offsets, rows, side="right") - 1)
        for v in vids[~self._verified[vids]].tolist():
            a, b = int(self.offsets[v]), int(self.offsets[v + 1])
            if self.layout == "contiguous":
                rb = self._row_bytes
                feats = np.frombuffer(self._map, self.dtype, (b - a) * self.shape[1], self._start + a * rb)
                crc = video_checksum(feats, self._frames[a:b])
                del feats  # no export may outlive a read: close() unmaps
                if hasattr(mmap, "MADV_DONTNEED"):  # as _read_mapped: resident memory stays at about a video
                    p = (self._start + a * rb) // mmap.PAGESIZE * mmap.PAGESIZE
                    self._map.madvise(mmap.MADV_DONTNEED, p, self._start + b * rb - p)
            else:
                crc = video_checksum(self._ds[a:b], self._frames[a:b])
            if crc != int(self._sums[v]):
                raise _damaged_video(self.path, self.split, self.videos[v])
            self._verified[v] = True

    def _read_mapped(self, rows: np.ndarray, out: np.ndarray) -> None:
        rb, start = self._row_bytes, self._start
        view = np.frombuffer(self._map, self.dtype, self.shape[0] * self.shape[1], start).reshape(self.shape)
        np.take(view, rows, axis=0, out=out, mode="clip")  # rows are checked; "raise" would buffer ``out``
        del view  # no export may outlive a read: close() unmaps
        if hasattr(mmap, "MADV_DONTNEED"):
            a = (start + int(rows[0]) * rb) // mmap.PAGESIZE * mmap.PAGESIZE
            self._map.madvise(mmap.MADV_DONTNEED, a, start + (int(rows[-1]) + 1) * rb - a)

    def _read_chunks(self, rows: np.ndarray, out: np.ndarray) -> None:
        c = self._chunk_rows
        ids = rows // c
        cut = np.flatnonzero(np.diff(ids)) + 1
        for i, j in zip(np.r_[0, cut].tolist(), np.r_[cut, len(rows)].tolist()):
            a = int(ids[i]) * c
            b = min(a + c, self.shape[0])
            self._ds.read_direct(self._buf, np.s_[a:b], np.s_[0:b - a])
            out[i:j] = self._buf[rows[i:j] - a]

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> LazySplit:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_handles(mapped: mmap.mmap | None, h5: Any) -> None:
    if mapped is not None:
        mapped.close()
    if h5 is not None:
        with contextlib.suppress(Exception):
            h5.close()


def _inconsistency(g: Any, offsets: np.ndarray | None, dim: int, n_classes: int) -> str | None:
    """What disagrees between a split's datasets (sizes, ``offsets`` as read from it, labels), or
    None. Reads only the per-video arrays: a cache this tool wrote always passes; one edited or
    damaged may not."""
    names = ("features", "offsets", "labels", "videos", "frame_indices", "fps")
    missing = [n for n in names if n not in g]
    if missing:
        return f"no {', '.join(missing)}"
    feats, labels = g["features"], g["labels"][()]
    n = len(labels)
    if feats.ndim != 2 or feats.shape[1] != dim:
        return f"features of shape {feats.shape}, not (frames, {dim})"
    if len(offsets) != n + 1 or len(g["videos"]) != n or len(g["fps"]) != n:
        return f"{n} labels, {len(g['videos'])} videos, {len(g['fps'])} fps and {len(offsets)} offsets"
    if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != feats.shape[0] \
            or len(g["frame_indices"]) != feats.shape[0]:
        return f"offsets do not cut its {feats.shape[0]} feature rows ({len(g['frame_indices'])} frame indices) into videos"
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        return f"labels outside 0..{n_classes - 1}"
    if "checksums" in g and len(g["checksums"]) != n:
        return f"{len(g['checksums'])} checksums for {n} videos"
    return None


class FeatureCache:
    """Read a feature cache: ``load_split`` for a whole split in RAM, ``video`` for lazy access.

    >>> cache = FeatureCache("features/demo.h5")
    >>> data = cache.load_split("train")        # one sequential read
    >>> data.video(0).shape                      # (T, 1280)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _check_cache_path(self.path)
        self._f = _open(self.path)
        try:
            with _reading(self.path):
                _check_schema(self._f, self.path)
                self.classes: list[str] = json.loads(self._f.attrs["classes"])
                self.provenance = Provenance.from_dict(json.loads(self._f.attrs["provenance"]))
                self.config: dict[str, Any] = json.loads(self._f.attrs.get("config", "{}"))
                self.failures: list[dict[str, Any]] = json.loads(self._f.attrs.get("failures", "[]"))
                list(self._f)  # the root group's index: damage there shows now, not in the first read
        except BaseException:
            self._f.close()
            raise
        self._offsets: dict[str, np.ndarray] = {}  # of the splits opened so far, checked (``_group``)

    @property
    @_reads
    def splits(self) -> list[str]:
        return sorted(self._f.keys())

    @property
    def frame_spec(self) -> FrameSpec:
        return self.provenance.frame_spec

    @_reads
    def _group(self, split: str):
        if split not in self._f:
            raise CacheError(
                f"split {split!r} is not in {self.path} (has: {', '.join(self.splits) or 'none'})"
            )
        g = self._f[split]
        if split not in self._offsets:
            offsets = g["offsets"][()] if "offsets" in g else None
            problem = _inconsistency(g, offsets, self.provenance.feature_dim, len(self.classes))
            if problem:
                raise CacheError(f"{self.path}: split {split!r} is inconsistent ({problem}); re-extract it with "
                                 "extract-features --overwrite")
            self._offsets[split] = offsets
        return g

    @_reads
    def load_split(self, split: str) -> SplitData:
        g = self._group(split)
        ds = g["features"]
        features = np.empty(ds.shape, dtype=ds.dtype)
        if features.size:
            ds.read_direct(features)
        data = SplitData(
            features=features, offsets=g["offsets"][()], labels=g["labels"][()],
            videos=_strings(g["videos"][()]), frame_indices=g["frame_indices"][()], fps=g["fps"][()],
            classes=list(self.classes), provenance=self.provenance,
        )
        if "checksums" in g:  # about 0.5 s a GB here
            for i, want in enumerate(g["checksums"][()].tolist()):
                a, b = data.offsets[i], data.offsets[i + 1]
                if video_checksum(features[a:b], data.frame_indices[a:b]) != want:
                    raise _damaged_video(self.path, split, data.videos[i])
        return data

    @_reads
    def verify(self, split: str, block_bytes: int = 64 << 20, *, finite: bool = False) -> None:
        """Check ``split`` as loading it would (its datasets agree, each video matches its checksum;
        with ``finite``, no NaN/Inf), reading it in blocks of about ``block_bytes``: memory stays
        flat whatever its size."""
        g = self._group(split)
        sums = g["checksums"][()].tolist() if "checksums" in g else None
        if sums is None and not finite:
            return
        offsets, videos = self._offsets[split], None
        ds, fi = g["features"], g["frame_indices"]
        n = len(offsets) - 1
        rows_per_block = max(1, block_bytes // max(ds.shape[1] * ds.dtype.itemsize, 1))
        v = 0
        while v < n:
            w = v + 1  # videos v..w-1 in one read: at least one, whole videos only
            while w < n and offsets[w + 1] - offsets[v] <= rows_per_block:
                w += 1
            a0, b0 = int(offsets[v]), int(offsets[w])
            feats = ds[a0:b0]
            if sums is not None:
                frames = fi[a0:b0]
                for i in range(v, w):
                    a, b = int(offsets[i]) - a0, int(offsets[i + 1]) - a0
                    if video_checksum(feats[a:b], frames[a:b]) != sums[i]:
                        raise _damaged_video(self.path, split, _strings(g["videos"][i:i + 1])[0])
            if finite and len(feats):
                videos = videos if videos is not None else _strings(g["videos"][()])
                check_finite(feats, np.arange(a0, b0), offsets, videos, split, self.path)
            v = w

    @_reads
    def checksums(self, split: str) -> list[int] | None:
        """The checksum of each video's rows (``video_checksum``), in order; None for caches written
        before they were kept."""
        g = self._group(split)
        return g["checksums"][()].tolist() if "checksums" in g else None

    def open_lazy(self, split: str, *, checked: bool = False) -> LazySplit:
        """``split`` for on-demand reading (``LazySplit.read_rows``): for caches larger than RAM.
        ``checked``: ``verify`` has read it through, so reads need not check the checksums."""
        return LazySplit(self.path, split, self._group(split), self.classes, self.provenance, checked=checked)

    def layout(self, split: str) -> str:
        """``contiguous`` (row-wise lazy reads) or ``chunked`` (older caches; see ``rewrite_cache``)."""
        return _layout(self._group(split)["features"])

    def feature_bytes(self, split: str) -> int:
        """Bytes of ``split``'s features: what holding it in memory takes."""
        ds = self._group(split)["features"]
        return int(ds.size) * ds.dtype.itemsize

    @_reads
    def num_videos(self, split: str) -> int:
        return len(self._group(split)["labels"])

    @_reads
    def video(self, split: str, i: int) -> tuple[np.ndarray, int]:
        """(T, D) features and the label of video ``i``, read on demand (caches larger than RAM)."""
        g = self._group(split)
        offs = self._offsets[split]
        feats, _ = _video_rows(self.path, g, i, int(offs[i]), int(offs[i + 1]))
        return feats, int(g["labels"][i])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
