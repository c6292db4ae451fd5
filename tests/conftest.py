"""Tiny datasets made in tmp_path; no network, random-init backbones saved to disk."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Under pytest-xdist (`make test` runs `pytest -n auto`) the workers share the cores: one thread each,
# and in the processes they start, so OpenMP teams do not spin against each other (unless the caller
# set OMP_NUM_THREADS). A test whose check needs more than one thread sets its own (``threads`` below).
if os.environ.get("PYTEST_XDIST_WORKER") and not os.environ.get("OMP_NUM_THREADS"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.backbones import create_backbone, recalibrate_batchnorm  # noqa: E402
from pipeline.demo import write_video  # noqa: E402

SIZE = 32  # network input size used by the tests: MobileNetV2 stays fast on two cores


def threads_of_a_new_thread() -> int:
    """torch's intra-op thread count as a thread started now sees it. With OpenMP each thread has its
    own count, and a new thread inherits the one last set in any thread: a helper thread that sets
    its own and is not undone shows here, not in the caller's ``torch.get_num_threads()``."""
    import threading

    seen: list[int] = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    return seen[0]


@pytest.fixture
def threads():
    """Two intra-op threads for the test, whatever the process has (one per pytest-xdist worker): a
    check that the code restores torch's thread count cannot fail when the count is already 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    assert threads_of_a_new_thread() == 2
    yield 2
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _pipeline_logger():
    """The CLI sets up the ``pipeline`` logger (its level, its own handler, no propagation) for the
    process; a test that runs it in process must not change what later tests' caplog sees."""
    import logging

    log = logging.getLogger("pipeline")
    state = log.level, log.handlers[:], log.propagate
    yield
    log.handlers[:], log.propagate = state[1], state[2]
    log.setLevel(state[0])  # through setLevel: it clears the loggers' cached levels


@pytest.fixture
def plots_drawn(monkeypatch) -> list[tuple[str, int]]:
    """The run plots drawn, in order, as they are drawn: ("curves", epochs shown) and ("confusion",
    the epoch confusion.png shows; confusion_test.png is left out). The real plots are still drawn."""
    import pipeline.run as run_mod

    drawn: list[tuple[str, int]] = []
    curves, confusion = run_mod.plot_curves, run_mod.plot_confusion

    def spy_curves(history, path):
        drawn.append(("curves", len(history)))
        curves(history, path)

    def spy_confusion(cm, classes, path, title=""):
        if path.name == "confusion.png":
            drawn.append(("confusion", int(title.split("epoch ")[1].split(":")[0])))
        confusion(cm, classes, path, title)

    monkeypatch.setattr(run_mod, "plot_curves", spy_curves)
    monkeypatch.setattr(run_mod, "plot_confusion", spy_confusion)
    return drawn


def rand_frames(rng: np.random.Generator, n: int, h: int = 24, w: int = 32) -> list[np.ndarray]:
    """Smooth-ish random RGB frames (uint8 H×W×3) that survive JPEG reasonably."""
    base = rng.integers(0, 256, (n, h // 4, w // 4, 3)).astype(np.uint8)
    return [np.kron(b, np.ones((4, 4, 1), dtype=np.uint8)) for b in base]


def write_frames(folder: Path, frames: list[np.ndarray], ext: str = ".png", name: str = "frame_{}",
                 start: int = 1) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, f in enumerate(frames, start):
        p = folder / (name.format(i) + ext)
        Image.fromarray(f).save(p, quality=95)
        paths.append(p)
    return paths


def write_faststart_mp4(path: Path, frames: list[np.ndarray], fps: int = 25) -> None:
    """h264 .mp4 with its header (moov) before the frames, as web videos are: a cut file still opens."""
    from pipeline.demo import write_video

    write_video(path, frames, fps, options={"movflags": "faststart"})


def write_rotated_mp4(path: Path, frames: list[np.ndarray], degrees: int, fps: int = 25) -> None:
    """An h264 .mp4 whose track header carries a display matrix, as a phone writes a portrait
    recording: ``degrees`` -90 shows the stored frames turned 90° clockwise (ffprobe: "rotation of
    -90.00 degrees"), 180 upside down."""
    import struct

    from pipeline.demo import write_video

    write_video(path, frames, fps)
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd") - 4  # the box: size, type, version and flags, times, ..., then the matrix
    matrix = at + 8 + 4 + (20 if data[at + 8] == 0 else 32) + 16
    one = 0x10000
    a, b, c, d = {-90: (0, one, -one, 0), 90: (0, -one, one, 0), 180: (-one, 0, 0, -one)}[degrees]
    struct.pack_into(">9i", data, matrix, a, b, 0, c, d, 0, 0, 0, 0x40000000)
    path.write_bytes(bytes(data))


def damage_packet(path: Path, k: int) -> None:
    """Overwrite the data of video packet ``k`` of ``path`` with noise, its size and the file's
    length kept (as a bad sector or a lost datagram leaves a frame): the demuxer reads it whole and
    the decoder refuses it."""
    import av

    with av.open(str(path)) as c:
        packet = [p for p in c.demux(c.streams.video[0]) if p.size][k]
        pos, size = packet.pos, packet.size
    data = bytearray(path.read_bytes())  # all of it, its headers too: garbage that decodes to a frame is concealed
    data[pos:pos + size] = np.random.default_rng(k).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))


def cut_file(path: Path, keep: int) -> None:
    """Keep the first ``keep`` bytes of ``path`` (as an interrupted copy or download does)."""
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def calibrated_backbone_file(name: str, folder: Path) -> Path:
    """``folder``/backbone.pt: a random-init ``name`` with BatchNorm recalibrated on noise (seed 0),
    which gives non-degenerate features."""
    torch.manual_seed(0)
    model = create_backbone(name, "none").net
    g = torch.Generator().manual_seed(0)
    recalibrate_batchnorm(model, [torch.randn(16, 3, SIZE, SIZE, generator=g) for _ in range(4)])
    path = folder / "backbone.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> Path:
    """A random-init MobileNetV2 with BatchNorm recalibrated on noise: non-degenerate features."""
    return calibrated_backbone_file("mobilenet_v2", tmp_path_factory.mktemp("weights"))


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """<root>/{train,test}/<class>/<video>: png and jpg folders (unpadded names) and lossless .mkv."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    write_frames(root / "train" / "walk" / "w1", rand_frames(rng, 12), ".png")
    write_frames(root / "train" / "walk" / "w2", rand_frames(rng, 5), ".jpg")
    write_frames(root / "train" / "run" / "r1", rand_frames(rng, 7), ".PNG")
    (root / "train" / "run").mkdir(parents=True, exist_ok=True)
    write_video(root / "train" / "run" / "r2.mkv", rand_frames(rng, 9), fps=10)
    # 'jump' exists only in the test split: labels must still agree across splits
    write_frames(root / "test" / "jump" / "j1", rand_frames(rng, 6), ".png")
    write_frames(root / "test" / "walk" / "w3", rand_frames(rng, 4), ".png")
    return root


@pytest.fixture(scope="session")
def exported(tmp_path_factory, weights_file):
    """A stage-two checkpoint over the MobileNetV2 of ``weights_file`` (seq-len 6, 2 eval clips) and
    its ONNX export, shared by the export, predict and live tests. The TorchScript exporter takes
    3 s here, the dynamo one 12 s; the default (dynamo first) is tested on ResNet-18 and the heads."""
    pytest.importorskip("onnxruntime")
    from synthetic import write_checkpoint

    from pipeline.config import ExportConfig
    from pipeline.export import export_model

    tmp = tmp_path_factory.mktemp("exported")
    ckpt = write_checkpoint(tmp / "model.pt", weights=weights_file, size=SIZE)
    result = export_model(ExportConfig(checkpoint=str(ckpt), out=str(tmp / "model.onnx"), exporter="legacy"))
    return ckpt, result
