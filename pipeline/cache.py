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

Crash safety. HDF5 is not safe to kill mid-write, so the cache file is never written in place.
While extracting, every finished video is saved as its own small file in ``<name>.h5.partial/``
(written to a temporary name, then atomically renamed); a kill at any instant loses at most the
videos in flight. When all videos are done, the cache is assembled into ``<name>.h5.tmp`` (the
existing cache's videos plus the new ones, in dataset order) and atomically renamed over
``<name>.h5``. So a rerun resumes exactly, and the result is identical to an uninterrupted run.

Schema 1 (before backbones were a choice) is read as it is: its provenance is MobileNetV2 with a
FrameSpec whose short side equals its crop (``config.Provenance.from_dict`` migrates it).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .config import FrameSpec, Provenance
from .errors import CacheError
from .files import atomic_path, atomic_write_bytes

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: the provenance names the backbone; FrameSpec has resize size and interpolation
CHUNK_BYTES = 256 * 1024
# Failures found by indexing (a name that is not UTF-8, an unreadable folder), not by decoding: a
# rerun finds them afresh, and retrying a video for them would redo it on every run, for nothing.
INDEX_FAILURES = frozenset({"name", "folder"})


def _h5py():
    import h5py

    return h5py


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
        self.provenance = provenance
        partial = read_partial(self.path)
        if partial is not None and partial["provenance"].mismatch(provenance):
            if not replace:
                self._check_compatible(self.partial, partial["provenance"])
            shutil.rmtree(self.partial)  # unfinished work with other settings, being replaced
            partial = None
        self.replace = replace or bool(partial and partial["replace"])
        if not self.replace:
            self._check_compatible(self.path, read_provenance(self.path) if self.path.exists() else None)
        if partial is None or partial["replace"] != self.replace:
            self.partial.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.partial / "meta.json",
                               _json({"provenance": provenance.to_dict(), "replace": self.replace}).encode())

    def _check_compatible(self, where: Path, old: Provenance | None) -> None:
        if old is None:
            return
        diff = old.mismatch(self.provenance)
        if diff:
            raise CacheError(
                f"{where} was made with different settings ({diff}); use another --output, "
                "or --overwrite to replace it"
            )

    # -- parts ---------------------------------------------------------------------------------

    def _part_path(self, split: str, rel: str) -> Path:
        return self.partial / split / (hashlib.sha1(rel.encode("utf-8", "surrogateescape")).hexdigest()[:20] + ".npz")

    def done(self, split: str) -> set[str]:
        """Relative paths of videos already stored, in the cache file or as finished parts.

        Videos stored with broken frames are not counted: a rerun retries them, so a repaired
        frame gets in."""
        done: set[str] = set()
        if self.path.exists() and not self.replace:
            with _open(self.path) as f:
                if split in f:
                    retry = {x["video"] for x in json.loads(f.attrs.get("failures", "[]"))
                             if x.get("split") == split and x.get("skipped") not in INDEX_FAILURES}
                    done.update(v for v in _strings(f[split]["videos"][()]) if v not in retry)
        d = self.partial / split
        if d.is_dir():
            for p in d.glob("*.npz"):
                try:
                    with np.load(p) as z:
                        if int(z["broken"]) == 0:
                            done.add(str(z["rel"]))
                except Exception:  # noqa: BLE001 - a part torn by a power cut: redo that video
                    log.warning("discarding unreadable part %s", p)
                    p.unlink(missing_ok=True)
        return done

    def add(self, split: str, rec: VideoRecord) -> None:
        """Store one finished video; atomic, so a kill leaves either all of it or nothing."""
        p = self._part_path(split, rec.rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p, hint=self._kept_hint()) as tmp, open(tmp, "wb") as f:
            np.savez(f, rel=np.array(rec.rel), label=np.int64(rec.label), features=rec.features,
                     frame_indices=rec.frame_indices.astype(np.int64), fps=np.float32(rec.fps),
                     broken=np.int64(rec.broken_frames))

    def _kept_hint(self) -> str:
        n = sum(1 for _ in self.partial.glob("*/*.npz")) if self.partial.is_dir() else 0
        return f"{n} finished video(s) are kept in {self.partial}"

    def pending(self) -> bool:
        """Finished parts not yet in the cache file."""
        return self.partial.is_dir() and any(self.partial.glob("*/*.npz"))

    def failures_unchanged(self, failures: list[dict[str, Any]], order: dict[str, Sequence[str]]) -> bool:
        """The cache file already lists exactly the failures ``finalize`` would store."""
        if self.replace or not self.path.exists():
            return False
        with _open(self.path) as f:
            old = json.loads(f.attrs.get("failures", "[]"))
        return _merge_failures(old, failures, order) == old

    def close_unchanged(self) -> None:
        """Nothing new to write: drop the work folder, keep the cache file as it is."""
        shutil.rmtree(self.partial, ignore_errors=True)

    def _parts(self, split: str) -> dict[str, Path]:
        d = self.partial / split
        out = {}
        for p in sorted(d.glob("*.npz")) if d.is_dir() else []:
            with np.load(p) as z:
                out[str(z["rel"])] = p
        return out

    # -- assembly ------------------------------------------------------------------------------

    def finalize(self, order: dict[str, Sequence[str]], attrs: dict[str, Any]) -> Path:
        """Write the cache: existing videos + finished parts, each split in ``order`` (dataset
        order; videos not in it keep their previous order after those that are)."""
        old = _open(self.path) if self.path.exists() and not self.replace else None
        hint = self._kept_hint()
        try:
            # An upper bound of the new file's size: the parts hold the same rows with more overhead.
            need = sum(p.stat().st_size for p in self.partial.glob("*/*.npz")) if self.partial.is_dir() else 0
            need += self.path.stat().st_size if old is not None else 0
            old_splits = set(old.keys()) if old is not None else set()
            part_splits = {p.name for p in self.partial.iterdir() if p.is_dir()} if self.partial.exists() else set()
            failures = _merge_failures(json.loads(old.attrs.get("failures", "[]")) if old else [],
                                       attrs.pop("failures", []), order)
            with atomic_path(self.path, hint=hint) as tmp, _h5_errors(), _h5_reserved(tmp, need) as out:
                for split in sorted(old_splits | part_splits | set(order)):
                    sources: dict[str, Any] = {}
                    if old is not None and split in old:
                        g = old[split]
                        offs = g["offsets"][()]
                        for i, rel in enumerate(_strings(g["videos"][()])):
                            sources[rel] = ("old", g, i, offs)
                    for rel, p in self._parts(split).items():
                        sources[rel] = ("part", p)
                    if split in order:  # the split as indexed now: stale videos must not leak in
                        ranked = [r for r in order[split] if r in sources]
                        stale = len(sources) - len(ranked)
                        if stale:
                            log.warning("dropped %d cached video(s) of split %r that are no longer in it "
                                        "(moved, deleted, or another split definition)", stale, split)
                    else:
                        ranked = list(sources)
                    _write_split(out, split, (self._record(sources[r], r) for r in ranked),
                                 self.provenance.dtype, self.provenance.feature_dim)
                _write_root_attrs(out, self.provenance, {**attrs, "failures": _json(failures)})
                out.flush()  # write errors surface here, not in a destructor
        finally:
            if old is not None:
                old.close()
        shutil.rmtree(self.partial, ignore_errors=True)
        return self.path

    @staticmethod
    def _record(src: tuple, rel: str) -> VideoRecord:
        if src[0] == "old":
            _, g, i, offs = src
            a, b = int(offs[i]), int(offs[i + 1])
            return VideoRecord(rel, int(g["labels"][i]), g["features"][a:b], g["frame_indices"][a:b],
                               float(g["fps"][i]))
        with np.load(src[1]) as z:
            return VideoRecord(rel, int(z["label"]), z["features"], z["frame_indices"], float(z["fps"]))


def write_cache(path: str | Path, provenance: Provenance, splits: dict[str, Iterator[VideoRecord]],
                attrs: dict[str, Any] | None = None) -> Path:
    """Write a whole cache in one go (synthetic caches, merges): temporary file, then atomic rename."""
    path = Path(path)
    with atomic_path(path) as tmp, _h5_errors(), _h5py().File(tmp, "w") as out:
        for split, records in splits.items():
            _write_split(out, split, records, provenance.dtype, provenance.feature_dim)
        _write_root_attrs(out, provenance, {"failures": "[]", **(attrs or {})})
        out.flush()
    return path


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


def _merge_failures(old: list[dict], new: list[dict], order: dict[str, Sequence[str]]) -> list[dict]:
    """Failures of this run replace those of earlier runs for the splits it covered; those found
    by indexing replace all earlier ones (every run indexes every split)."""
    return [f for f in old if f.get("split") not in order and f.get("skipped") not in INDEX_FAILURES] + new


def _write_split(out: Any, split: str, records: Iterator[VideoRecord], dtype: str, dim: int) -> None:
    g = out.create_group(split)
    feats = frames = None
    offsets, labels, videos, fps = [0], [], [], []
    for rec in records:
        if feats is None:
            dim = rec.features.shape[1]
            rows = max(1, CHUNK_BYTES // (dim * np.dtype(dtype).itemsize))
            feats = g.create_dataset("features", shape=(0, dim), maxshape=(None, dim), dtype=dtype,
                                     chunks=(rows, dim))
            frames = g.create_dataset("frame_indices", shape=(0,), maxshape=(None,), dtype="int64",
                                      chunks=(max(rows, 4096),))
        n, t = offsets[-1], rec.features.shape[0]
        feats.resize(n + t, axis=0)
        feats[n:] = rec.features.astype(dtype, copy=False)
        frames.resize(n + t, axis=0)
        frames[n:] = rec.frame_indices
        offsets.append(n + t)
        labels.append(rec.label)
        videos.append(rec.rel)
        fps.append(rec.fps)
    if feats is None:
        g.create_dataset("features", shape=(0, dim), dtype=dtype)
        g.create_dataset("frame_indices", shape=(0,), dtype="int64")
    h5py = _h5py()
    g.create_dataset("offsets", data=np.asarray(offsets, dtype=np.int64))
    g.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
    g.create_dataset("videos", data=np.asarray(videos, dtype=object), dtype=h5py.string_dtype())
    g.create_dataset("fps", data=np.asarray(fps, dtype=np.float32))


def _strings(arr: np.ndarray) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in arr]


def _open(path: Path):
    h5py = _h5py()
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise CacheError(f"cannot read feature cache {path}: {e}; re-extract it with --overwrite") from e


def read_provenance(path: str | Path) -> Provenance:
    with _open(Path(path)) as f:
        _check_schema(f, Path(path))
        return Provenance.from_dict(json.loads(f.attrs["provenance"]))


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

    def video(self, i: int) -> np.ndarray:
        """(T, D) features of video ``i``."""
        return self.features[self.offsets[i]:self.offsets[i + 1]]


class FeatureCache:
    """Read a feature cache: ``load_split`` for a whole split in RAM, ``video`` for lazy access.

    >>> cache = FeatureCache("features/demo.h5")
    >>> data = cache.load_split("train")        # one sequential read
    >>> data.video(0).shape                      # (T, 1280)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"feature cache not found: {self.path}; run extract-features first")
        self._f = _open(self.path)
        _check_schema(self._f, self.path)
        self.classes: list[str] = json.loads(self._f.attrs["classes"])
        self.provenance = Provenance.from_dict(json.loads(self._f.attrs["provenance"]))
        self.config: dict[str, Any] = json.loads(self._f.attrs.get("config", "{}"))
        self.failures: list[dict[str, Any]] = json.loads(self._f.attrs.get("failures", "[]"))
        self._offsets: dict[str, np.ndarray] = {}

    @property
    def splits(self) -> list[str]:
        return sorted(self._f.keys())

    @property
    def frame_spec(self) -> FrameSpec:
        return self.provenance.frame_spec

    def _group(self, split: str):
        if split not in self._f:
            raise CacheError(
                f"split {split!r} is not in {self.path} (has: {', '.join(self.splits) or 'none'})"
            )
        return self._f[split]

    def load_split(self, split: str) -> SplitData:
        g = self._group(split)
        ds = g["features"]
        features = np.empty(ds.shape, dtype=ds.dtype)
        if features.size:
            ds.read_direct(features)
        return SplitData(
            features=features, offsets=g["offsets"][()], labels=g["labels"][()],
            videos=_strings(g["videos"][()]), frame_indices=g["frame_indices"][()], fps=g["fps"][()],
            classes=list(self.classes), provenance=self.provenance,
        )

    def num_videos(self, split: str) -> int:
        return len(self._group(split)["labels"])

    def video(self, split: str, i: int) -> tuple[np.ndarray, int]:
        """(T, D) features and the label of video ``i``, read on demand (caches larger than RAM)."""
        g = self._group(split)
        if split not in self._offsets:
            self._offsets[split] = g["offsets"][()]
        offs = self._offsets[split]
        return g["features"][offs[i]:offs[i + 1]], int(g["labels"][i])

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
