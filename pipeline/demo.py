"""A small synthetic HMDB51-style dataset that needs a temporal model.

Eight classes in four pairs; each pair's videos are exact time reversals of each other, so every
frame of one class could equally belong to its twin and only the order of frames tells them apart:

* ``grow`` / ``shrink``: a disc whose radius grows or shrinks;
* ``fade_in`` / ``fade_out``: a textured scene brightening or darkening;
* ``red_to_blue`` / ``blue_to_red``: the background colour drifting;
* ``pan_right`` / ``pan_left``: a window panning across a wide colour gradient.

Videos are frame folders (jpg and png, unpadded names ``frame_1 ... frame_N``) and a few video
files (mpeg4 .avi and h264 .mp4), at 80×60, 16 to 28 frames.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import DataError
from .files import ensure_dir

WIDTH, HEIGHT = 80, 60
PAIRS = (("grow", "shrink"), ("fade_in", "fade_out"), ("red_to_blue", "blue_to_red"),
         ("pan_right", "pan_left"))
CLASSES = tuple(sorted(c for pair in PAIRS for c in pair))


@dataclass(frozen=True)
class DemoInfo:
    root: Path
    classes: tuple[str, ...]
    videos: dict[str, int]
    frame_folders: int
    video_files: int


def write_video(path: Path, frames: Sequence[np.ndarray], fps: float = 25, codec: str | None = None,
                options: dict[str, str] | None = None) -> None:
    """Write (H, W, 3) uint8 RGB frames as a video file with PyAV.

    Codec defaults by extension: .avi mpeg4, .mp4 libx264, .mkv ffv1 (lossless RGB), .webm vp9,
    .mov png (lossless RGB), .ts mpeg4 (MPEG-TS: streams front to back without seeking).
    ``options``: the container's (e.g. ``{"movflags": "faststart"}``: an .mp4's index first).
    """
    import av
    from fractions import Fraction

    ext = path.suffix.lower()
    codec = codec or {".avi": "mpeg4", ".mp4": "libx264", ".mkv": "ffv1", ".webm": "libvpx-vp9",
                      ".mov": "png", ".ts": "mpeg4"}[ext]
    pix_fmt = {"ffv1": "bgr0", "png": "rgb24", "mjpeg": "yuvj420p"}.get(codec, "yuv420p")
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", container_options=options or {}) as c:
        s = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = w, h, pix_fmt
        if codec == "mpeg4":
            s.options = {"qscale": "2"}
            s.bit_rate = 4_000_000
        elif codec == "libx264":
            s.options = {"crf": "12", "preset": "veryfast"}
        for arr in frames:
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth random texture in [0, 1], (h, w, 3): upsampled coarse noise."""
    coarse = rng.random((h // 10 + 2, w // 10 + 2, 3))
    ys, xs = np.linspace(0, coarse.shape[0] - 1.001, h), np.linspace(0, coarse.shape[1] - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    c = coarse
    return ((c[y0][:, x0] * (1 - fy) + c[y0 + 1][:, x0] * fy) * (1 - fx)
            + (c[y0][:, x0 + 1] * (1 - fy) + c[y0 + 1][:, x0 + 1] * fy) * fx)


def _forward_clip(kind: str, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    """Frames (uint8 H×W×3) of the first class of a pair; its twin is this clip reversed."""
    h, w = HEIGHT, WIDTH
    t = np.linspace(0.0, 1.0, n)
    tex = _texture(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    if kind == "grow":
        cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
        colour = rng.uniform(0.5, 1.0, 3)
        bg = 0.25 * tex
        r0, r1 = rng.uniform(2, 5), rng.uniform(22, 30)
        for ti in t:
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= (r0 + (r1 - r0) * ti) ** 2)[..., None]
            frames.append(np.where(mask, colour, bg))
    elif kind == "fade_in":
        lo, hi = rng.uniform(0.05, 0.15), rng.uniform(0.85, 1.0)
        for ti in t:
            frames.append(tex * (lo + (hi - lo) * ti))
    elif kind == "red_to_blue":
        a, b = np.array([0.9, 0.1, 0.1]), np.array([0.1, 0.1, 0.9])
        for ti in t:
            frames.append(0.7 * (a + (b - a) * ti) + 0.3 * tex)
    elif kind == "pan_right":
        wide = np.linspace(0, 1, 3 * w)
        grad = np.stack([wide, 1 - wide, 0.5 + 0.5 * np.sin(6 * wide)], -1)[None].repeat(h, 0)
        for ti in t:
            x0 = int(round(ti * 2 * w))
            frames.append(0.8 * grad[:, x0:x0 + w] + 0.2 * tex)
    else:
        raise ValueError(kind)
    noise = [rng.normal(0, 0.02, (h, w, 3)) for _ in frames]
    return [np.clip((f + z) * 255, 0, 255).astype(np.uint8) for f, z in zip(frames, noise)]


def demo_clip(cls: str, rng: np.random.Generator, n: int) -> list[np.ndarray]:
    for first, second in PAIRS:
        if cls == first:
            return _forward_clip(first, rng, n)
        if cls == second:
            return _forward_clip(first, rng, n)[::-1]
    raise ValueError(f"unknown demo class {cls!r}")


MARKER = ".demo.json"  # hidden, so the dataset index ignores it


def existing_demo(root: str | Path, **params: int) -> DemoInfo | None:
    """The demo dataset at ``root`` if it was written by ``make_demo_data`` with ``params``."""
    try:
        meta = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("params") != params:
        return None
    return DemoInfo(root=Path(root), classes=tuple(meta["classes"]), videos=meta["videos"],
                    frame_folders=meta["frame_folders"], video_files=meta["video_files"])


def make_demo_data(root: str | Path, *, per_class_train: int = 12, per_class_test: int = 4,
                   seed: int = 0, overwrite: bool = False,
                   progress: Callable[[int], None] | None = None) -> DemoInfo:
    """Write ``<root>/{train,test}/<class>/<video>``; built in a temporary folder, then renamed."""
    root = Path(root)
    params = {"per_class_train": per_class_train, "per_class_test": per_class_test, "seed": seed}
    if root.exists() and not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; give a folder for the demo dataset")
    ensure_dir(root.parent, "dataset folder")  # one line if it cannot be written
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise DataError(f"{root} already exists and is not empty; use --overwrite or another folder")
        shutil.rmtree(root)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    counts, folders, files = {}, 0, 0
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        counts[split] = 0
        for ci, cls in enumerate(CLASSES):
            d = tmp / split / cls
            d.mkdir(parents=True)
            for k in range(per_class):
                frames = demo_clip(cls, rng, int(rng.integers(16, 29)))
                name = f"{cls}_{split}_{k + 1}"
                if (k + ci) % 5 == 4:  # a few video files, two containers
                    write_video(d / (name + (".avi" if k % 2 else ".mp4")), frames, fps=15)
                    files += 1
                else:
                    vdir = d / name
                    vdir.mkdir()
                    ext = ".png" if (k + ci) % 2 else ".jpg"
                    for i, f in enumerate(frames, 1):
                        Image.fromarray(f).save(vdir / f"frame_{i}{ext}", quality=95)
                    folders += 1
                counts[split] += 1
                if progress:
                    progress(1)
    (tmp / MARKER).write_text(json.dumps({"params": params, "classes": CLASSES, "videos": counts,
                                          "frame_folders": folders, "video_files": files}))
    if root.exists():
        root.rmdir()
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(root)
    return DemoInfo(root=root, classes=CLASSES, videos=counts, frame_folders=folders, video_files=files)
