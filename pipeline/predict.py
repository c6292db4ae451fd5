"""Label new videos, or a live source, from a trained model alone: a checkpoint (torch) or an
exported .onnx (onnxruntime). The backbone, FrameSpec, frame selection, clip sampling and classes all
come from the model file; nothing is retyped.

Frames stream through the same decode workers and fixed-size backbone batches as extraction, so
each frame is decoded once and memory does not grow with video length (only the features are
kept: 2.5 KB per frame for MobileNetV2's 1280 dimensions in float16). Without a window, a video is
classified exactly as ``evaluate`` classifies its cached features (same features, same uniform
clips); with ``window``/``stride`` it gets a timeline, and the video-level label is the mean of the
window probabilities. The math sits behind one ``Classifier`` interface (per-frame features,
per-clip probabilities) with a torch and an onnxruntime implementation; decoding, windows,
timeline and JSON are shared. ``LiveRun`` labels a live source window by window as it plays.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .backbones import FrozenBackbone
from .config import FrameSelection, FrameSpec
from .data import (IMAGE_EXTS, VIDEO_EXTS, VideoDecodeError, bad_frame_names, frame_times, list_frames, natural_key,
                   printable, video_kind)
from .engine import FeatureBank, averaged_probs
from .errors import ConfigError
from .extract import FeatureRunner, frame_loader
from .model import load_model
from .preprocess import resize_frames, stack_frames
from .runtime import autocast_ctx, default_workers, resolve_device, resolve_precision

log = logging.getLogger(__name__)


@dataclass
class Window:
    start_frame: int
    end_frame: int  # inclusive, source frame numbers
    start_time: float | None
    end_time: float | None
    label: str
    prob: float
    probs: list[float] = field(repr=False, default_factory=list)


@dataclass
class Prediction:
    input: str
    kind: str | None = None
    frames: int = 0  # frames run through the backbone
    fps: float | None = None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    probs: np.ndarray | None = field(default=None, repr=False)
    logits_source: str = "clips"
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"input": self.input, "kind": self.kind, "frames": self.frames, "fps": self.fps,
                             "top_k": [{"label": c, "prob": p} for c, p in self.top_k], "error": self.error}
        if self.windows:
            d["windows"] = [{"start_frame": w.start_frame, "end_frame": w.end_frame, "start_time": w.start_time,
                             "end_time": w.end_time, "label": w.label, "prob": w.prob} for w in self.windows]
        return d


def find_inputs(paths: Sequence[str | Path]) -> tuple[list[tuple[Path, str]], list[Prediction]]:
    """Expand inputs into (path, kind) videos; a folder of frames is one video, any other folder is
    searched recursively for video files and frame folders. Unusable inputs come back as errors.
    Each video is listed once, however many inputs reach it (``predict data data/walk``, a file
    given twice, a link to a folder beside the folder): what an earlier input already listed is
    skipped with a note."""
    videos: list[tuple[Path, str]] = []
    errors: list[Prediction] = []
    seen: dict[tuple[int, int], Path] = {}  # (device, inode) of every folder walked and video listed → its path
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            errors.append(Prediction(str(p), error=f"{p}: no such file or folder"))
            continue
        if (key := _identity(p)) in seen:
            log.info("skipped %s: an earlier input already lists it", p)
            continue
        if p.is_file():
            if p.suffix.lower() in VIDEO_EXTS:
                seen[key] = p
                videos.append((p, "file"))
            else:
                errors.append(Prediction(str(p), error=f"{p}: unsupported file type {p.suffix or '(none)'}; expected a "
                                         f"video ({', '.join(sorted(VIDEO_EXTS))}) or a folder of frames"))
        elif _frame_folder(p) and not _holds(p)[1]:
            seen[key] = p
            videos.append((p, "frames"))
        else:
            skipped: list[Path] = []
            found = list(_walk(p, seen, skipped, earlier=frozenset(seen)))
            if not found and not skipped:
                other = _other_images(p)
                why = (f"its images are {'/'.join(other)}, and a frame folder holds jpg or png frames (convert them)"
                       if other else "no videos or frame folders inside")
                errors.append(Prediction(str(p), error=f"{p}: {why}"))
            elif not found:
                log.info("skipped %s: an earlier input already lists all it holds", p)
            videos += found
    for p, kind in videos:
        for f in bad_frame_names(p) if kind == "frames" else ():
            log.warning("ignored '%s': its name is not valid UTF-8; rename it", printable(f))
    return videos, errors


def _identity(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_dev, st.st_ino


def _holds(folder: Path) -> tuple[bool, bool]:
    """Whether ``folder`` holds images, and video files, hidden files (``._x.jpg``) left out. A
    folder of video files is none of frames, whatever images sit beside them (a poster, a
    thumbnail): its videos are found, and the images are said to be ignored."""
    images = videos = False
    for f in folder.iterdir():
        if f.name.startswith(".") or not f.is_file():
            continue
        images = images or f.suffix.lower() in IMAGE_EXTS
        videos = videos or f.suffix.lower() in VIDEO_EXTS
    if images and videos:
        log.warning("ignored the images in %s: it holds video files, so it is no frame folder", folder)
    return images, videos


OTHER_IMAGE_EXTS = frozenset({".bmp", ".webp", ".gif", ".tif", ".tiff", ".avif", ".heic", ".jp2"})


def _other_images(folder: Path) -> list[str]:
    """The image types in ``folder`` that frame folders do not take (.bmp, .webp...), sorted."""
    try:
        return sorted({f.suffix.lower() for f in folder.iterdir()
                       if f.suffix.lower() in OTHER_IMAGE_EXTS and not f.name.startswith(".")})
    except OSError:
        return []


def _frame_folder(p: Path) -> bool:
    try:
        return bool(list_frames(p))
    except VideoDecodeError:  # frames, of several sequences: decoding reports it as this input's error
        return True


def _walk(folder: Path, seen: dict[tuple[int, int], Path] | None = None, skipped: list[Path] | None = None,
          earlier: frozenset[tuple[int, int]] = frozenset()) -> Iterator[tuple[Path, str]]:
    """Video files and frame folders under ``folder``; each real folder and video is visited once
    (``seen``: device and inode), so a symlink loop (``again -> .``) or two links to one folder give
    each video once. What ``earlier`` inputs already listed is left out and appended to ``skipped``;
    a second name of a video met in this walk (a link, a hard link) is left out with a note."""
    seen = {} if seen is None else seen
    skipped = [] if skipped is None else skipped
    try:
        here = _identity(folder)
        entries = sorted(folder.iterdir(), key=lambda q: natural_key(q.name))
    except OSError as e:
        log.warning("skipped %s: %s", folder, e.strerror or e)
        return
    if here in seen:
        if here in earlier:
            skipped.append(folder)
        return
    seen[here] = folder
    for q in entries:
        if q.name.startswith("."):
            continue
        if q.is_dir():
            try:
                images, videos = _holds(q)
            except OSError as e:
                log.warning("skipped %s: %s", q, e.strerror or e)
                continue
            if not images and not videos and (other := _other_images(q)):
                log.warning("ignored %s: its images are %s; a frame folder holds jpg or png frames (convert them)",
                            q, "/".join(other))
            if not images or videos:
                yield from _walk(q, seen, skipped, earlier)
                continue
            kind = "frames"
        elif video_kind(q) == "file":
            kind = "file"
        else:
            continue
        try:
            key = _identity(q)
        except OSError:  # a dangling link: decoding reports it as this video's error
            yield q, kind
            continue
        if key in earlier:
            skipped.append(q)
        elif key in seen:
            log.info("skipped %s: the same %s as %s", q, "file" if kind == "file" else "folder", seen[key])
        else:
            seen[key] = q
            yield q, kind


def _in_input_order(preds: list[Prediction], inputs: Sequence[str | Path]) -> list[Prediction]:
    """``preds`` in the order of the inputs they came from (a video found in a folder: that
    folder's place), each input's own in their order: a missing file listed second was reported
    after every video."""
    first: dict[Path, int] = {}
    for i, r in enumerate(inputs):
        first.setdefault(Path(r), i)

    def origin(pred: Prediction) -> int:  # the first input it is, or lies under: one lookup per parent
        p = Path(pred.input)
        return min((first[q] for q in (p, *p.parents) if q in first), default=len(inputs))

    return sorted(preds, key=origin)  # stable


def window_bounds(n: int, window: int, stride: int) -> list[tuple[int, int]]:
    """[start, end) row ranges: every ``stride`` rows, plus one flush with the end so the tail is
    covered; one window of all rows if the video is shorter than ``window``."""
    if n <= window:
        return [(0, n)]
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    return [(s, s + window) for s in starts]


class Classifier:
    """The math of predict, behind one interface so the torch and onnxruntime paths share the rest
    (decoding, windows, timeline, JSON): per-frame ``features`` and per-clip ``clip_probs``.

    Attributes: ``classes``, ``spec`` (FrameSpec), ``selection``, ``seq_len``, ``eval_clips``,
    ``dtype`` (storage dtype features are rounded to, as in the cache the head was trained on),
    ``device`` and ``amp`` (autocast dtype) for the frame batches, ``runtime`` ("torch"/"onnx").
    """

    runtime: str
    classes: list[str]
    spec: FrameSpec
    selection: FrameSelection
    seq_len: int
    eval_clips: int
    dtype: str
    device: torch.device
    amp: torch.dtype | None = None

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) uint8 frames (channels_last memory) on ``device`` → (N, D) features."""
        raise NotImplementedError

    def clip_probs(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T, D) float32 clips on ``device``, (B,) real lengths (the rest is padding) → (B, C)."""
        raise NotImplementedError

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:  # FeatureRunner calls its model on frame batches
        return self.features(frames)


class TorchClassifier(Classifier):
    """Backbone (``FrozenBackbone``) and head rebuilt from a checkpoint."""

    runtime = "torch"

    def __init__(self, checkpoint: str | Path, *, weights: str | Path | None = None, device: str = "auto") -> None:
        self.model = load_model(checkpoint)
        prov = self.model.provenance
        self.classes = self.model.classes
        self.spec, self.selection = prov.frame_spec, prov.selection
        self.seq_len, self.eval_clips, self.dtype = self.model.seq_len, self.model.eval_clips, prov.dtype
        self.device = resolve_device(device)
        precision = _precision_name(prov.precision)
        if precision == "fp16" and self.device.type != "cuda":  # extracted on a GPU, predicted on a CPU
            log.warning("the features %s was trained on were computed in float16 on a GPU; on the CPU the backbone "
                        "runs in float32 (results differ by float16 rounding)", Path(checkpoint).name)
            precision = "fp32"
        self.amp = resolve_precision(precision, self.device)
        self.backbone = FrozenBackbone(self.model.backbone(weights).net.to(self.device).eval(), self.spec, copy=False)
        self.head = self.model.head.to(self.device).eval()

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        return self.backbone(frames)

    @torch.no_grad()
    def clip_probs(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(x, lengths).float(), 1)  # as engine.evaluate computes them


class OnnxClassifier(Classifier):
    """An exported .onnx file alone: its metadata gives everything, onnxruntime does the math. The
    full graph is run as its two parts (split at ``features``), so each frame goes through the
    backbone once and the head runs per clip, as in the torch path."""

    runtime = "onnx"

    def __init__(self, path: str | Path, *, threads: int | None = None, provider: str = "cpu") -> None:
        """``provider="cuda"``: onnxruntime's CUDA execution provider (tensors here stay on the CPU,
        onnxruntime copies them)."""
        from .export import OnnxMeta, load_onnx, ort_session, read_metadata, split_model

        self.path = Path(path)
        proto = load_onnx(self.path)
        meta: OnnxMeta = read_metadata(proto, self.path)
        if meta.graph != "full":
            raise ConfigError(f"{self.path} is a head-only export (features in, not frames); predict needs the full "
                              "model: export the checkpoint again without --head-only")
        self.meta = meta
        self.classes = list(meta.classes)
        self.spec, self.selection = meta.frame_spec, meta.selection
        self.seq_len, self.eval_clips, self.dtype = meta.seq_len, meta.eval_clips, meta.feature_dtype
        self.device = torch.device("cpu")
        backbone, head = split_model(proto)
        self.backbone, self.head = ort_session(backbone, threads, provider), ort_session(head, threads, provider)

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.permute(0, 2, 3, 1).contiguous().numpy()[None]  # (1, N, S, S, 3): channels_last is a view
        return torch.from_numpy(self.backbone.run(None, {"frames": x})[0][0])  # (N, D)

    def clip_probs(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Clips of one length run together; a short clip runs unpadded (its real frames only),
        which the head contract makes equal to the padded clip with its length."""
        x_np, lens = x.cpu().numpy(), lengths.cpu().numpy()
        out = np.empty((len(lens), len(self.classes)), dtype=np.float32)
        for n in np.unique(lens):
            rows = np.flatnonzero(lens == n)
            out[rows] = self.head.run(None, {"features": np.ascontiguousarray(x_np[rows, :n])})[0]
        return torch.from_numpy(out)


def open_classifier(model: str | Path, *, runtime: str = "auto", weights: str | Path | None = None,
                    device: str = "auto", threads: int | None = None) -> Classifier:
    """A checkpoint (torch) or an exported .onnx (onnxruntime); ``auto`` goes by the file name.
    ``threads``: intra-op threads of onnxruntime's sessions (torch's count is process-wide: set it
    with ``torch.set_num_threads``); None: torch's count, one per core."""
    path = Path(model)
    checkpoint = path.is_file() and _head(path) in (b"PK", b"\x80\x02")  # by its bytes, whatever its name
    onnx_file = path.suffix.lower() == ".onnx" and not checkpoint
    if runtime == "auto":
        runtime = "onnx" if onnx_file else "torch"
    if runtime == "onnx":
        if checkpoint:
            raise ConfigError(f"{path} is a torch checkpoint, not an ONNX file: export it first "
                              f"(`python cli.py export {path} --out model.onnx`) or use --runtime torch")
        if weights is not None:
            raise ConfigError("--weights is for checkpoints: an .onnx file holds its backbone")
        return OnnxClassifier(path, threads=threads, provider="cuda" if device == "cuda" else "cpu")
    if runtime != "torch":
        raise ConfigError(f"unknown runtime {runtime!r}: use auto, torch or onnx")
    if onnx_file:
        raise ConfigError(f"{path} is an ONNX file: use --runtime onnx (or auto)")
    return TorchClassifier(path, weights=weights, device=device)


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(2)  # a zip (torch.save) or a pickle (older torch.save)


def window_probs(clf: Classifier, feats: np.ndarray, bounds: list[tuple[int, int]], batch_size: int = 256
                 ) -> np.ndarray:
    """(W, C) probabilities of the windows ``bounds`` of ``feats`` (T, D), in batches; each window
    is classified exactly as ``evaluate`` classifies a video of those rows (softmax averaged over
    ``eval_clips`` uniform clips of ``seq_len``)."""
    dev = clf.device
    starts = torch.tensor([a for a, _ in bounds], dtype=torch.int64, device=dev)
    bank = FeatureBank(torch.from_numpy(feats).to(dev), starts, np.array([b - a for a, b in bounds]),
                       torch.zeros(len(bounds), dtype=torch.long, device=dev))
    return averaged_probs([clf.clip_probs], bank, seq_len=clf.seq_len, num_clips=clf.eval_clips,
                          batch_size=batch_size)[0].cpu().numpy()


def _check_window(window: int | None, stride: int | None) -> None:
    if window is not None and window < 1 or stride is not None and stride < 1:
        raise ConfigError("--window and --stride must be >= 1")


def _file_times(path: Path) -> list[float] | None:
    """``data.frame_times``, or None where the file cannot be demuxed again (its frames decoded:
    the windows then keep the stream's average rate)."""
    try:
        return frame_times(path)
    except VideoDecodeError:
        return None


class Predictor:
    """A checkpoint or an exported .onnx; call ``predict`` with paths, or ``live`` with a source."""

    def __init__(self, model: str | Path, *, runtime: str = "auto", weights: str | Path | None = None,
                 device: str = "auto", batch_size: int = 64, workers: int | None = None,
                 chunk_frames: int = 64, threads: int | None = None, folder_fps: float | None = None) -> None:
        self.classifier = open_classifier(model, runtime=runtime, weights=weights, device=device, threads=threads)
        c = self.classifier
        self.classes: list[str] = c.classes
        self.spec, self.selection, self.seq_len, self.eval_clips, self.dtype = (
            c.spec, c.selection, c.seq_len, c.eval_clips, c.dtype)
        if folder_fps is not None:  # the rate of the frame folders given to predict, not those trained on
            self.selection = dataclasses.replace(self.selection, folder_fps=folder_fps)
        self.device, self.amp = c.device, c.amp
        self.batch_size, self.chunk_frames = batch_size, chunk_frames
        self.workers = default_workers(self.device) if workers is None else workers

    def features(self, videos: Sequence[tuple[Path, str]], *, progress: bool = True
                 ) -> Iterator[tuple[int, np.ndarray | None, np.ndarray | None, float, str | None]]:
        """→ (video position, (T, D) features in the cache dtype, (T,) source indices, fps, error)."""
        runner = FeatureRunner(self.classifier, self.device, self.amp, self.batch_size)
        loader = frame_loader([(i, p, k) for i, (p, k) in enumerate(videos)], self.spec, self.selection,
                              chunk_frames=self.chunk_frames, workers=self.workers,
                              device=self.device, batch_size=self.batch_size)
        bar = tqdm(total=len(videos), unit="video", desc="predict", disable=not progress or None, dynamic_ncols=True)

        def done(pos: int):
            v = runner.pop(pos)
            bar.update(1)
            for skipped, e in v.frame_errors:
                log.warning("skipped %s: %s", skipped, e)
            if v.error is not None or not v.rows:
                return pos, None, None, v.fps, v.error or f"{videos[pos][0]}: no decodable frames"
            feats = torch.cat(v.rows).to("cpu").numpy().astype(self.dtype)
            return pos, feats, torch.cat(v.indices).numpy(), v.fps, None

        try:
            for chunk in loader:
                for pos in runner.feed(chunk):
                    yield done(pos)
            for pos in runner.flush():
                yield done(pos)
        finally:
            bar.close()
        self.frames_done = runner.frames_done

    def classify_windows(self, feats: np.ndarray, bounds: list[tuple[int, int]]) -> np.ndarray:
        """(W, C) probabilities of every window in one batched pass (see ``window_probs``)."""
        return window_probs(self.classifier, feats, bounds)

    def predict(self, inputs: Sequence[str | Path], *, top_k: int = 5, window: int | None = None,
                stride: int | None = None, progress: bool = True) -> list[Prediction]:
        _check_window(window, stride)
        videos, errors = find_inputs(inputs)
        folders = [p for p, kind in videos if kind == "frames"]
        if folders and self.selection.fps is not None and self.selection.folder_fps is None:
            def need(which: str) -> str:
                return (f"this model keeps {self.selection.fps:g} frames/s, so {which} need their frame rate: add "
                        "--folder-fps (the rate they were extracted at, e.g. 30 for HMDB51, 25 for UCF101)")

            if len(folders) == len(videos):  # nothing could be labelled: one line, at once
                raise ConfigError(need(f"frame folders such as {folders[0]}"))
            errors = [Prediction(str(p), kind="frames", error=f"{p}: {need('frame folders')}")
                      for p in folders] + errors
            videos = [(p, kind) for p, kind in videos if kind != "frames"]  # the others are still labelled
        results: dict[int, Prediction] = {}
        k = min(top_k, len(self.classes))
        for pos, feats, idx, fps, err in self.features(videos, progress=progress):
            path, kind = videos[pos]
            fps = None if fps is None or np.isnan(fps) else float(fps)
            if kind == "frames" and fps is None:
                fps = self.selection.folder_fps
            pred = Prediction(str(path), kind=kind, fps=fps)
            results[pos] = pred
            if err is not None:
                pred.error = err
                continue
            pred.frames = len(feats)
            if window is None:
                probs = self.classify_windows(feats, [(0, len(feats))])[0]  # the whole video, as evaluate does
            else:
                wins = []
                bounds = window_bounds(len(feats), window, stride or window)
                # A file's frames at their own timestamps (a variable-rate recording's pauses are
                # real time, as --live reports them); frame folders at their constant rate.
                times = _file_times(path) if kind == "file" else None

                def at(i: int) -> float | None:
                    return times[i] if times is not None and i < len(times) else i / fps if fps else None

                for (a, b), p in zip(bounds, self.classify_windows(feats, bounds)):
                    s, e = int(idx[a]), int(idx[b - 1])
                    wins.append(Window(s, e, at(s), at(e), self.classes[int(p.argmax())], float(p.max()), p.tolist()))
                pred.windows = wins
                probs = np.mean([w.probs for w in wins], axis=0)
            pred.probs = probs
            order = np.argsort(-probs)[:k]
            pred.top_k = [(self.classes[i], float(probs[i])) for i in order]
        return _in_input_order([results[i] for i in sorted(results)] + errors, inputs)

    def live(self, source: str, **kw: Any) -> LiveRun:
        """Label a live source window by window (see ``LiveRun``)."""
        return LiveRun(self.classifier, source, **kw)


# ----------------------------------------------------------------------------------- live video


@dataclass
class LiveWindow:
    index: int  # 0, 1, 2, ... in the order emitted
    start_frame: int  # source frame numbers of the window's first and last frame
    end_frame: int
    start_time: float  # their times in seconds since the stream's first frame
    end_time: float
    label: str
    prob: float
    latency: float  # seconds from the source delivering the window's last frame to its label
    dropped: int  # frames dropped so far (the model was slower than the source)
    probs: list[float] = field(repr=False, default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"window": self.index, "start_frame": self.start_frame, "end_frame": self.end_frame,
                "start_time": round(self.start_time, 6), "end_time": round(self.end_time, 6), "label": self.label,
                "prob": self.prob, "latency_ms": round(1000 * self.latency, 3), "dropped": self.dropped}


@dataclass
class LiveSummary:
    source: str
    windows: int
    frames_read: int  # decoded from the source
    frames_kept: int  # kept by the frame selection
    frames_classified: int  # run through the backbone
    dropped: int  # kept but dropped because the model was busy
    reconnects: int
    latency_mean: float | None  # seconds, over the windows
    latency_p50: float | None
    latency_p95: float | None
    seconds: float
    ended: str  # "end of file", "end of stream", "interrupted", "lost", "stopped"
    error: str | None = None
    damaged: int = 0  # packets the decoder refused, skipped with their frames

    def to_json(self) -> dict[str, Any]:
        ms = lambda v: None if v is None else round(1000 * v, 3)  # noqa: E731
        return {"summary": {"source": self.source, "windows": self.windows, "frames_read": self.frames_read,
                            "frames_kept": self.frames_kept, "frames_classified": self.frames_classified,
                            "dropped": self.dropped, "reconnects": self.reconnects, "damaged_packets": self.damaged,
                            "latency_ms_mean": ms(self.latency_mean), "latency_ms_p50": ms(self.latency_p50),
                            "latency_ms_p95": ms(self.latency_p95), "seconds": round(self.seconds, 3),
                            "ended": self.ended, "error": self.error}}


class LiveRun:
    """A rolling window of ``window`` kept frames (default: seq-len), classified every ``stride``
    frames (default: half the window) as the frames arrive; iterate for ``LiveWindow``s.

    Each frame goes through the backbone once, when it arrives (all frames waiting in the queue
    together); a window is classified like a file's window (``window_probs``). When the model is
    slower than the source, the stream drops the oldest waiting frames (``queue_size`` at most
    wait), so the windows stay current and memory stays flat; ``summary()`` counts them. A window
    never spans a reconnection (``--reconnect``): the frames before the gap are dropped and the
    window fills again from the new connection's, so it never mixes two stretches of video that
    may be minutes apart. When the source ends, frames since the last window get one more window,
    flush with the end, as a file's windows do (``window_bounds``); not after Ctrl-C. Call
    ``close()`` when done (also after Ctrl-C).
    """

    def __init__(self, classifier: Classifier, source: str, *, window: int | None = None,
                 stride: int | None = None, realtime: bool = False, reconnect: bool = False, queue_size: int = 2,
                 timeout: float = 10.0, retries: int | None = None, drop: bool | None = None) -> None:
        from .stream import LiveStream

        _check_window(window, stride)
        self.clf = classifier
        self.window = window or classifier.seq_len
        self.stride = stride or max(1, self.window // 2)
        spec = classifier.spec
        self.stream = LiveStream(source, selection=classifier.selection, realtime=realtime, reconnect=reconnect,
                                 transform=lambda f: resize_frames(f, spec), queue_size=queue_size, drop=drop,
                                 timeout=timeout, retries=retries)
        self.source, self.queue_size = source, queue_size
        self.latencies: list[float] = []
        self.classified = 0
        self.interrupted = False
        self._t0 = time.perf_counter()

    def __iter__(self) -> Iterator[LiveWindow]:
        rows: deque[np.ndarray] = deque(maxlen=self.window)  # (D,) features of the last frames
        frames: deque = deque(maxlen=self.window)
        since = 0  # frames since the last window

        def window() -> LiveWindow:  # the frames held now, classified as one window
            p = window_probs(self.clf, np.stack(rows), [(0, len(rows))])[0]
            self.latencies.append(time.perf_counter() - frames[-1].arrival)
            return LiveWindow(len(self.latencies) - 1, frames[0].index, frames[-1].index, frames[0].time,
                              frames[-1].time, self.clf.classes[int(p.argmax())], float(p.max()), self.latencies[-1],
                              self.stream.stats.dropped, p.tolist())

        self._warm_up()
        for batch in self.stream.batches():
            feats = self._features(stack_frames([f.image for f in batch]))  # (n, D)
            for f, row in zip(batch, feats):
                if frames and f.connection != frames[-1].connection:  # a reconnection: start afresh
                    rows.clear()
                    frames.clear()
                    since = 0
                rows.append(row)
                frames.append(f)
                self.classified += 1
                since += 1
                if len(rows) < self.window or (since < self.stride and self.latencies):
                    continue
                since = 0
                yield window()
        if since and not self.interrupted:  # frames no window has ended on: the last window flush with the
            yield window()  # end (or a connection shorter than the window whole), as a file's last window is

    def _warm_up(self) -> None:
        """One pass of each batch shape before the source starts: first calls are slow (kernel
        selection, allocations), and would otherwise cost the first frames."""
        s = self.clf.spec.size
        for n in range(1, self.queue_size + 1):
            x = torch.zeros(n, 3, s, s, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            f = self._features(x)
        window_probs(self.clf, np.repeat(f[:1], self.window, axis=0), [(0, self.window)])

    def _features(self, frames: torch.Tensor) -> np.ndarray:
        """(n, 3, S, S) uint8 frames → (n, D) features in the cache's dtype, as predict stores them."""
        with torch.inference_mode(), autocast_ctx(self.clf.device, self.clf.amp):
            return self.clf.features(frames.to(self.clf.device)).float().cpu().numpy().astype(self.clf.dtype)

    def close(self, *, interrupted: bool = False) -> None:
        """Stop the source; ``interrupted``: the user stopped it (Ctrl-C), which is no error."""
        self.interrupted = self.interrupted or interrupted
        self.stream.close()

    def summary(self) -> LiveSummary:
        lat = np.array(self.latencies)
        st = self.stream.stats
        ended = "interrupted" if self.interrupted else self.stream.ended or "stopped"
        return LiveSummary(
            source=self.source, windows=len(lat), frames_read=st.read, frames_kept=st.kept,
            frames_classified=self.classified, dropped=st.dropped, reconnects=st.reconnects,
            latency_mean=float(lat.mean()) if len(lat) else None,
            latency_p50=float(np.percentile(lat, 50)) if len(lat) else None,
            latency_p95=float(np.percentile(lat, 95)) if len(lat) else None,
            seconds=time.perf_counter() - self._t0, ended=ended, error=None if self.interrupted else self.stream.error,
            damaged=st.damaged)


def _precision_name(p: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(p, "auto")


def plot_timeline(pred: Prediction, classes: Sequence[str], path: Path, top: int = 5) -> None:
    """Probability of the most likely classes over time, one line each, windows as steps."""
    from .report import _plt, save_figure

    plt = _plt()
    probs = np.array([w.probs for w in pred.windows])  # (W, C)
    use_time = pred.windows[0].start_time is not None
    x = np.array([(w.start_time + w.end_time) / 2 if use_time else (w.start_frame + w.end_frame) / 2
                  for w in pred.windows])
    best = np.argsort(-probs.mean(0))[:top]
    fig, ax = plt.subplots(figsize=(10, 3.5))
    for c in best:
        ax.plot(x, probs[:, c], marker="o", ms=3, label=classes[c])
    ax.set(xlabel="time (s)" if use_time else "frame", ylabel="probability", ylim=(0, 1.02),
           title=f"{Path(pred.input).name}: {pred.top_k[0][0]} ({pred.top_k[0][1]:.2f})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)

