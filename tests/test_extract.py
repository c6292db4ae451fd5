"""Stage one: cached features equal the backbone's own output; resume, provenance, weights."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, SIZE, rand_frames, threads_of_a_new_thread, write_frames, write_rotated_mp4
from PIL import Image

from pipeline.backbones import FrozenBackbone, create_backbone
from pipeline.files import sha256_file
from pipeline.cache import FeatureCache, read_provenance
from pipeline.config import DatasetSpec, ExtractConfig, FrameSelection, FrameSpec
from pipeline.data import decode_image_file, index_dataset, list_frames, read_frames, selected_positions
from pipeline.errors import CacheError, ConfigError, WeightsError
from pipeline.extract import extract_features, frame_loader
from pipeline.preprocess import preprocess, resize_frames
from pipeline.demo import write_video


def config(root: Path, out: Path, weights: Path | str, **kw) -> ExtractConfig:
    kw.setdefault("frame_spec", FrameSpec(size=SIZE))
    kw.setdefault("batch_size", 8)
    kw.setdefault("workers", 0)
    kw.setdefault("chunk_frames", 5)
    return ExtractConfig(dataset=DatasetSpec(str(root)), output=str(out), weights=str(weights), **kw)


def reference_frames(path: Path) -> list[torch.Tensor]:
    """Decode a video independently of the pipeline's reader: PIL for png, torchvision for jpg."""
    if path.is_dir():
        out = []
        for p in list_frames(path):
            if p.suffix.lower() == ".png":
                out.append(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1))
            else:
                out.append(decode_image_file(p))
        return out
    import av

    with av.open(str(path)) as c:
        return [torch.from_numpy(f.to_ndarray(format="rgb24")).permute(2, 0, 1) for f in c.decode(video=0)]


def reference_features(weights: Path, frames: list[torch.Tensor], spec: FrameSpec) -> np.ndarray:
    model = create_backbone("mobilenet_v2", str(weights)).net
    with torch.inference_mode():
        return torch.cat([model(preprocess(f[None], spec)) for f in frames]).numpy()


@pytest.mark.parametrize("dtype, tol", [("float16", 3e-3), ("float32", 2e-4)])
def test_features_equal_backbone_on_same_frames(tiny_dataset, tmp_path, weights_file, dtype, tol):
    out = tmp_path / "f.h5"
    r = extract_features(config(tiny_dataset, out, weights_file, dtype=dtype, workers=1), progress=False)
    assert r.videos == {"test": 2, "train": 4} and r.failures == []
    with FeatureCache(out) as cache:
        assert cache.classes == ["jump", "run", "walk"]
        for split in ("train", "test"):
            data = cache.load_split(split)
            assert data.features.dtype == np.dtype(dtype) and data.features.shape[1] == 1280
            for i, rel in enumerate(data.videos):
                frames = reference_frames(tiny_dataset / rel)
                ref = reference_features(weights_file, frames, cache.frame_spec)
                got = data.video(i).astype(np.float32)
                assert got.shape == ref.shape
                np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * np.abs(ref).max())
                assert list(data.frame_indices[data.offsets[i]:data.offsets[i + 1]]) == list(range(len(frames)))
                assert cache.classes[data.labels[i]] == rel.split("/")[1]
                lazy, label = cache.video(split, i)
                assert np.array_equal(lazy, data.video(i)) and label == data.labels[i]
        fps = dict(zip(cache.load_split("train").videos, cache.load_split("train").fps))
        assert fps["train/run/r2.mkv"] == pytest.approx(10.0) and np.isnan(fps["train/walk/w1"])


def test_squash_and_crop_differ_and_are_recorded(tiny_dataset, tmp_path, weights_file):
    for mode in ("crop", "squash"):
        extract_features(config(tiny_dataset, tmp_path / f"{mode}.h5", weights_file,
                                frame_spec=FrameSpec(size=SIZE, resize=mode)), progress=False)
    with FeatureCache(tmp_path / "crop.h5") as a, FeatureCache(tmp_path / "squash.h5") as b:
        assert a.frame_spec.resize == "crop" and b.frame_spec.resize == "squash"
        assert not np.allclose(a.load_split("train").features, b.load_split("train").features)


def test_selection_indices_recorded(tiny_dataset, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    extract_features(config(tiny_dataset, out, weights_file, selection=FrameSelection(stride=2, max_frames=3)),
                     progress=False)
    with FeatureCache(out) as c:
        d = c.load_split("train")
        rows = {v: list(d.frame_indices[d.offsets[i]:d.offsets[i + 1]]) for i, v in enumerate(d.videos)}
        full = reference_features(weights_file, reference_frames(tiny_dataset / "train/walk/w1"), c.frame_spec)
        w1 = d.video(d.videos.index("train/walk/w1")).astype(np.float32)
    # w1: 12 frames → stride 2 → [0,2,4,6,8,10] → 3 uniformly spaced → [2, 6, 10]
    assert rows["train/walk/w1"] == [2, 6, 10]
    assert rows["train/walk/w2"] == [0, 2, 4]  # 5 frames → [0,2,4]
    assert rows["train/run/r2.mkv"] == [0, 4, 8]  # 9 frames → [0,2,4,6,8] → 3 of them
    np.testing.assert_allclose(w1, full[[2, 6, 10]], rtol=3e-3, atol=3e-3 * np.abs(full).max())


def test_fps_needs_folder_fps_for_frame_folders(tiny_dataset, tmp_path, weights_file):
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--folder-fps"):
        extract_features(config(tiny_dataset, tmp_path / "f.h5", weights_file,
                                selection=FrameSelection(fps=5)), progress=False)
    out = tmp_path / "g.h5"
    extract_features(config(tiny_dataset, out, weights_file, selection=FrameSelection(fps=5, folder_fps=10)),
                     progress=False)
    with FeatureCache(out) as c:
        d = c.load_split("train")
        rows = {v: list(d.frame_indices[d.offsets[i]:d.offsets[i + 1]]) for i, v in enumerate(d.videos)}
    assert rows["train/walk/w1"] == [0, 2, 4, 6, 8, 10]  # 10 fps folder → 5 fps
    assert rows["train/run/r2.mkv"] == [0, 2, 4, 6, 8]  # 10 fps video → 5 fps


def test_provenance_mismatch_refused_and_overwrite(tiny_dataset, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    extract_features(config(tiny_dataset, out, weights_file), progress=False)
    before = sha256_file(out)
    with pytest.raises(CacheError, match=r"FrameSpec .*--overwrite"):
        extract_features(config(tiny_dataset, out, weights_file, frame_spec=FrameSpec(size=48)), progress=False)
    other = tmp_path / "other.pt"
    sd = create_backbone("mobilenet_v2", str(weights_file)).net.state_dict()
    sd["features.0.0.weight"] = sd["features.0.0.weight"] * 2
    torch.save(sd, other)
    with pytest.raises(CacheError, match=r"weights .*--overwrite"):
        extract_features(config(tiny_dataset, out, other), progress=False)
    assert sha256_file(out) == before  # refused runs leave the cache untouched
    extract_features(config(tiny_dataset, out, other, overwrite=True), progress=False)
    with FeatureCache(out) as c:
        assert c.provenance.weights.sha256 == sha256_file(other)
    # a file that is no cache at all (a checkpoint given as --output by mistake): not even --overwrite replaces it
    with pytest.raises(ConfigError, match=r"--output .*other\.pt exists and is not an HDF5 feature cache"):
        extract_features(config(tiny_dataset, other, weights_file, overwrite=True), progress=False)
    assert sha256_file(other) == c.provenance.weights.sha256
    with pytest.raises(CacheError, match="is a folder; give the feature cache file"):
        FeatureCache(tmp_path)


def test_rerun_skips_and_extending_splits_equals_one_run(tiny_dataset, tmp_path, weights_file):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract_features(config(tiny_dataset, a, weights_file), progress=False)
    cfg = config(tiny_dataset, b, weights_file)
    r1 = extract_features(ExtractConfig(**{**cfg.__dict__, "dataset": DatasetSpec(str(tiny_dataset), splits=("test",))}),
                          progress=False)
    assert r1.videos == {"test": 2}
    b.chmod(0o664)  # a cache a lab shares: extending it keeps it writable by the group
    r2 = extract_features(cfg, progress=False)
    assert (r2.extracted, r2.reused) == (4, 2)
    assert stat.S_IMODE(b.stat().st_mode) == 0o664
    r3 = extract_features(cfg, progress=False)
    assert (r3.extracted, r3.reused) == (0, 6)
    assert_same_cache(a, b)


def test_splits_after_an_interrupted_run_keeps_its_parts_of_the_others_aside(tiny_dataset, tmp_path, weights_file,
                                                                             monkeypatch):
    """An interrupted run finished one of the two test videos; a rerun with --splits train must not
    write that one part as the test split (train-temporal would report "test" numbers on half of
    it), and the part is not lost: the run that extracts test later uses it."""
    from pipeline.cache import CacheWriter

    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract_features(config(tiny_dataset, a, weights_file), progress=False)
    add = CacheWriter.add

    def add_then_stop(self, split, rec):
        add(self, split, rec)
        if split == "test":
            raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "add", add_then_stop)
    cfg = config(tiny_dataset, b, weights_file)
    with pytest.raises(KeyboardInterrupt):
        extract_features(cfg, progress=False)
    monkeypatch.setattr(CacheWriter, "add", add)
    parts = Path(f"{b}.partial") / "test"
    assert len(list(parts.glob("*.npz"))) == 1
    r = extract_features(ExtractConfig(**{**cfg.__dict__, "dataset": DatasetSpec(str(tiny_dataset), splits=("train",))}),
                         progress=False)
    assert r.videos == {"train": 4}
    assert len(list(parts.glob("*.npz"))) == 1
    r = extract_features(ExtractConfig(**{**cfg.__dict__, "dataset": DatasetSpec(str(tiny_dataset), splits=("train",))}),
                         progress=False)  # nothing new for train: the cache file is left as it is, the part too
    assert (r.extracted, r.videos) == (0, {"train": 4}) and len(list(parts.glob("*.npz"))) == 1
    r = extract_features(cfg, progress=False)
    assert (r.extracted, r.reused) == (1, 5) and not parts.parent.exists()
    assert_same_cache(a, b)


def test_a_cache_that_cannot_be_replaced_or_leftovers_in_the_way_are_one_line(tiny_dataset, tmp_path, weights_file,
                                                                              monkeypatch):
    """The last step of an extraction renames the new file over the cache: where that is not
    allowed (another user's file in a sticky folder such as /tmp, an immutable file), one line that
    names the file and keeps every finished video; files of the wrong kind where the extraction
    keeps its work are named, and a temporary file a killed run left is removed."""
    import errno

    from click.testing import CliRunner

    from cli import main

    full, out = tmp_path / "full.h5", tmp_path / "c.h5"
    extract_features(config(tiny_dataset, full, weights_file), progress=False)
    cfg = config(tiny_dataset, out, weights_file)
    args = ["-q", "extract-features", "--data-dir", str(tiny_dataset), "--output", str(out), "--weights",
            str(weights_file), "--size", str(SIZE), "--resize-size", str(SIZE), "--batch-size", "8", "--workers", "0",
            "--no-progress"]
    assert CliRunner().invoke(main, [*args, "--splits", "test"]).exit_code == 0
    before = sha256_file(out)
    replace = os.replace

    def denied(src, dst):
        if Path(dst) == out:
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))
        return replace(src, dst)

    monkeypatch.setattr(os, "replace", denied)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert f"error: cannot write {out}: Operation not permitted; 4 finished video(s) are kept in {out}.partial" \
           in r.stderr
    assert sha256_file(out) == before and not Path(f"{out}.tmp").exists()
    monkeypatch.setattr(os, "replace", replace)
    r = extract_features(cfg, progress=False)
    assert (r.extracted, r.reused) == (0, 6)
    assert_same_cache(full, out)
    Path(f"{out}.tmp").write_bytes(b"left by a kill")
    extract_features(cfg, progress=False)  # nothing to do, but the leftover goes
    assert not Path(f"{out}.tmp").exists() and sha256_file(out) != before
    Path(f"{out}.partial").write_bytes(b"")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"{out}.partial is not a folder, but an extraction into {out} keeps its finished videos there" in r.stderr


def assert_same_cache(a: Path, b: Path) -> None:
    with h5py.File(a) as fa, h5py.File(b) as fb:
        assert sorted(fa) == sorted(fb)
        for split in fa:
            for name in ("features", "frame_indices", "offsets", "labels", "videos", "fps"):
                x, y = fa[split][name][()], fb[split][name][()]
                assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (split, name)
        for key in ("classes", "provenance", "failures", "schema_version"):
            assert fa.attrs[key] == fb.attrs[key], key


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), *args]


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, weights_file):
    """A real `python cli.py extract-features` killed with SIGKILL part-way, then rerun."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    for c in range(3):
        for v in range(10):
            write_frames(root / "train" / f"c{c}" / f"c{c}_v{v}", rand_frames(rng, 16), ".png")
    args = ["-q", "extract-features", "--data-dir", str(root), "--weights", str(weights_file), "--size", str(SIZE),
            "--batch-size", "8", "--workers", "1", "--no-progress"]
    ref, out = tmp_path / "ref.h5", tmp_path / "out.h5"
    subprocess.run(_cli(*args, "--output", str(ref)), check=True, cwd=tmp_path)
    proc = subprocess.Popen(_cli(*args, "--output", str(out)), cwd=tmp_path)
    parts = Path(f"{out}.partial") / "train"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("*.npz"))) < 8:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(parts.glob("*.npz")))
    assert 8 <= done < 30 and not out.exists(), "kill landed outside the run"
    rerun = subprocess.run(_cli(*args, "--output", str(out)), cwd=tmp_path, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{done} already cached" in rerun.stdout or f"{done + 1} already cached" in rerun.stdout
    assert not Path(f"{out}.partial").exists()
    assert_same_cache(ref, out)


def test_a_batchnorm_without_running_statistics_is_not_folded(monkeypatch):
    """track_running_stats=False normalises by each batch's own statistics, in eval too: there is
    nothing fixed to fold (fuse_conv_bn_eval raised a TypeError on its None running_var)."""
    import pipeline.backbones as B

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4, track_running_stats=False),
                              torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))
    net[3].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    for traced in (True, False):  # pairs from the fx graph, and the fallback for untraceable models
        if not traced:
            monkeypatch.setattr(B, "_graph", lambda model: None)
        fused = B.fuse_conv_bn(net)
        assert isinstance(fused[1], torch.nn.BatchNorm2d) and isinstance(fused[3], torch.nn.Identity)
        with torch.no_grad():
            torch.testing.assert_close(fused(x), net.eval()(x))


@pytest.mark.parametrize("spec", [FrameSpec(size=64), FrameSpec(size=64, mean=(0.2, 0.7, 0.5), std=(0.1, 0.4, 0.9))])
def test_frozen_backbone_equals_model_on_normalised_frames(weights_file, spec):
    from pipeline.preprocess import normalize_frames

    model = create_backbone("mobilenet_v2", str(weights_file)).net
    frozen = FrozenBackbone(model, spec)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # the original is untouched
    # Saturated borders: zero-padding the raw frames instead of the normalised ones would show here.
    frames = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    frames[:, :, :4] = 255
    frames[:, :, :, -4:] = 0
    with torch.inference_mode():
        ref = model(normalize_frames(frames, spec))
        for x in (frames, frames.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(frozen(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        assert frozen.center(frames).is_contiguous(memory_format=torch.channels_last)
        with pytest.raises(TypeError, match="uint8"):
            frozen(normalize_frames(frames, spec))


class _SameConv(torch.nn.Conv2d):
    """Pads inside its forward, as timm's Conv2dSame does: its padding attribute says 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.pad(x, (1, 1, 1, 1)))


class _Untraceable(torch.nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1:  # data-dependent control flow: fx cannot trace it, the fallbacks run
            return super().forward(x)
        return x


@pytest.mark.parametrize("first", ["identity", "conv_subclass_traced", "conv_subclass_untraceable"])
def test_frozen_backbone_whose_input_is_not_a_plain_conv(first):
    """The normalisation stays outside the network (in the right order), and a conv or BatchNorm
    subclass with its own forward is never folded as if it were the plain module."""
    from pipeline.preprocess import normalize_frames

    torch.manual_seed(0)
    spec = FrameSpec(size=32, mean=(0.2, 0.7, 0.5), std=(0.1, 0.4, 0.9))
    head = torch.nn.Identity() if first == "identity" else _SameConv(3, 8, 3, padding=0)
    layers = [head] + ([torch.nn.Conv2d(3, 8, 3, padding=1)] if first == "identity" else []) + [
        torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()]
    net = (_Untraceable if first == "conv_subclass_untraceable" else torch.nn.Sequential)(*layers).eval()
    for bn in (m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    frames = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = net(normalize_frames(frames, spec))
        frozen = FrozenBackbone(net, spec)
        torch.testing.assert_close(frozen(frames), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in frozen.modules()) == (0 if first == "identity" else 1)


class _SharedFirstConv(torch.nn.Module):
    """The conv that reads the input runs twice: on the input, then on its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.c = torch.nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.c(x))).mean((2, 3))


class _UntraceableShared(torch.nn.Module):
    """fx cannot trace it (a data-dependent branch); ``reuse`` says what else reads what: the input
    (a skip), the BatchNorm or the conv of a Sequential pair, each used twice."""

    def __init__(self, reuse: str) -> None:
        super().__init__()
        self.reuse, self.c2 = reuse, torch.nn.Conv2d(3, 3, 1)
        self.seq = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.BatchNorm2d(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.reuse == "input" else self.c2(x)
        y = self.seq(x)
        if float(y.mean()) > -1e9:
            again = {"input": lambda: x, "bn": lambda: self.seq[1](self.c2(y)), "conv": lambda: self.seq[0](x)}
            y = y + again[self.reuse]()
        return y.mean((2, 3))


@pytest.mark.parametrize("net", [_SharedFirstConv, lambda: _UntraceableShared("input"),
                                 lambda: _UntraceableShared("bn"), lambda: _UntraceableShared("conv")],
                         ids=["shared_first_conv", "untraceable_input_skip", "untraceable_bn_reused",
                              "untraceable_conv_reused"])
def test_modules_used_twice_or_an_input_read_twice_are_not_folded(net):
    """Folding changes a module's weights for each of its uses, and the input's normalisation for
    every reader of the input: a module that runs twice, or an input that a skip also reads, must
    stay as it is (the results were off by 38 % to 15x)."""
    from pipeline.preprocess import normalize_frames

    torch.manual_seed(0)
    net, spec = net().eval(), FrameSpec(size=32)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
    frames = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(normalize_frames(frames, spec))
        torch.testing.assert_close(FrozenBackbone(net, spec)(frames), ref, rtol=1e-4, atol=1e-5)


class _WithConv3d(torch.nn.Module):
    """A 2-d network with a Conv3d inside, as timm's LambdaNets have: a 5-d weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4)
        self.conv3d = torch.nn.Conv3d(4, 4, (1, 3, 3), padding=(0, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(self.bn(self.conv(x)).unsqueeze(2)).squeeze(2)
        return x.mean((2, 3))


def test_a_network_with_a_5d_weight_runs_channels_last():
    """Module.to(memory_format=channels_last) raises on a 5-d tensor: extract-features and
    finetune-end-to-end ended in that traceback for timm's LambdaNets. Only 4-d tensors move."""
    from pipeline.backbones import to_channels_last
    from pipeline.preprocess import normalize_frames

    torch.manual_seed(0)
    net, spec = _WithConv3d().eval(), FrameSpec(size=16)
    net.bn.running_mean.uniform_(-1, 1)
    frames = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = net(normalize_frames(frames, spec))
        torch.testing.assert_close(FrozenBackbone(net, spec)(frames), ref, rtol=1e-4, atol=1e-5)
    to_channels_last(net)
    assert net.conv.weight.is_contiguous(memory_format=torch.channels_last) and net.conv3d.weight.is_contiguous()


def test_frozen_backbone_under_bf16_autocast_and_on_another_device():
    """Folding costs no precision beyond bf16's own. Under autocast the input is centred before
    the first conv: with the centring folded into its bias, the conv rounded the raw pixels' large
    response to bf16 before the bias took it back off, 2.7x the unfolded network's error here."""
    from pipeline.backbones import recalibrate_batchnorm
    from pipeline.preprocess import normalize_frames

    torch.manual_seed(0)
    spec = FrameSpec(size=64)
    model = create_backbone("resnet18", "none").net
    noise = torch.randint(0, 256, (24, 3, 64, 64), generator=torch.Generator().manual_seed(1))
    frames = torch.nn.functional.avg_pool2d(noise.float(), 9, 1, 4).to(torch.uint8)  # smooth, like photos
    recalibrate_batchnorm(model, [normalize_frames(frames[:16], spec)])
    frozen = FrozenBackbone(model, spec)
    x = frames[16:]
    with torch.inference_mode():
        ref = model(normalize_frames(x, spec))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = model(normalize_frames(x, spec)).float()
            folded = frozen(x).float()
        torch.testing.assert_close(frozen(x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())  # fp32: folded
    assert (folded - ref).norm() <= 1.2 * (plain - ref).norm()
    # the folded constants follow the model's device (meta: shapes only, like an unmaterialised model)
    meta = FrozenBackbone(create_backbone("mobilenet_v2", "none").net.to("meta").eval(), spec)
    assert meta.offset.device.type == "meta" and all(p.device.type == "meta" for p in meta.net.parameters())


def test_weights_state_dict_variants(tiny_dataset, tmp_path, weights_file):
    import torchvision

    base = create_backbone("mobilenet_v2", str(weights_file)).net
    full = torchvision.models.mobilenet_v2()
    full.features.load_state_dict(base.features.state_dict())
    variants = {
        "full_with_classifier.pt": full.state_dict(),
        "features_only_no_prefix.pt": base.features.state_dict(),
        "ddp.pt": {f"module.{k}": v for k, v in full.state_dict().items()},
        "project_ckpt.pt": {"schema_version": 1, "backbone_state": base.state_dict()},
        "half.pt": {k: v.half() if v.is_floating_point() else v for k, v in full.state_dict().items()},
    }
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        want = base(x)
        for name, sd in variants.items():
            torch.save(sd, tmp_path / name)
            bb = create_backbone("mobilenet_v2", str(tmp_path / name))
            if name == "half.pt":  # read as float32: the model runs in float32, on fp16-rounded weights
                assert {p.dtype for p in bb.net.state_dict().values() if p.is_floating_point()} == {torch.float32}
                rounded = create_backbone("mobilenet_v2", str(weights_file)).net
                rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                                         for k, v in base.state_dict().items()})
                assert torch.equal(bb.net.eval()(x), rounded(x))
                continue
            assert torch.equal(bb.net.eval()(x), want), name
            assert bb.weights.source == "file" and bb.weights.sha256 == sha256_file(tmp_path / name)
    sd = base.state_dict()
    sd["features.18.0.weight"] = torch.full_like(sd["features.18.0.weight"], float("nan"))
    torch.save(sd, tmp_path / "nan.pt")
    out = tmp_path / "nan" / "f.h5"
    with pytest.raises(WeightsError, match=r"nan\.pt holds NaN/Inf in features\.18\.0\.weight, which the features go "
                                           r"through"):  # refused as it loads, before any frame
        extract_features(config(tiny_dataset, out, tmp_path / "nan.pt"), progress=False)
    assert list(out.parent.iterdir()) == []  # no cache, and no unfinished run to refuse the rerun below
    extract_features(config(tiny_dataset, out, weights_file), progress=False)
    # features past float16's range (a ResNet's last ReLU is not capped): inf as stored, refused; float32 keeps them
    r18 = create_backbone("resnet18", "none").net.state_dict()
    r18["layer4.1.bn2.bias"] = torch.full_like(r18["layer4.1.bn2.bias"], 1e5)
    torch.save(r18, tmp_path / "big.pt")
    with pytest.raises(WeightsError, match=r"not finite \(\d+ of \d+ values NaN or inf, stored as float16\)"):
        extract_features(config(tiny_dataset, tmp_path / "big16.h5", tmp_path / "big.pt", backbone="resnet18"),
                         progress=False)
    r = extract_features(config(tiny_dataset, tmp_path / "big32.h5", tmp_path / "big.pt", backbone="resnet18",
                                dtype="float32"), progress=False)
    with FeatureCache(r.output) as c:
        assert np.abs(c.load_split("train").features).max() > 65504
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pt")
    with pytest.raises(WeightsError, match="not a mobilenet_v2 state dict"):
        create_backbone("mobilenet_v2", str(tmp_path / "wrong.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="not a weights file this tool can load safely"):
        create_backbone("mobilenet_v2", str(tmp_path / "garbage.pt"))
    with pytest.raises(WeightsError, match="weights file not found"):
        create_backbone("mobilenet_v2", str(tmp_path / "missing.pt"))


def test_imagenet_offline_fails_with_actionable_message(monkeypatch, tmp_path):
    """Simulate no network (this machine has none anyway): the message names --weights PATH."""
    import urllib.error

    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*a, **k):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"could not download .* --weights PATH/TO/mobilenet_v2-"):
        create_backbone("mobilenet_v2", "imagenet")
    with pytest.raises(WeightsError, match="unknown weights"):
        create_backbone("mobilenet_v2", "IMAGENET1K_V9")


def test_calibration_on_fewer_frames_than_asked_says_how_many(tiny_dataset, tmp_path, caplog):
    r = extract_features(config(tiny_dataset, tmp_path / "f.h5", "none", calibration_frames=1000), progress=False)
    frames = torch.load(r.weights_file, weights_only=True)["meta"]["calibration_frames"]
    assert frames == 33  # the train split's 12 + 5 + 7 + 9 frames
    assert "on up to 1000 frames" in caplog.text
    assert "calibrated on only 33 frames of the 1000 asked (the videos are few or short)" in caplog.text


def test_weights_none_recalibrates_saves_and_reproduces(tiny_dataset, tmp_path):
    out = tmp_path / "f.h5"
    r = extract_features(config(tiny_dataset, out, "none", calibration_frames=32), progress=False)
    assert r.weights.source == "recalibrated"
    assert r.weights_file == tmp_path / f"f.backbone-{r.weights.sha256[:12]}.pt"
    with FeatureCache(out) as c:
        d = c.load_split("train")
        feats = d.features.astype(np.float32)
        assert (feats == 0).mean() < 0.9 and np.abs(feats).mean() > 1e-2  # degenerate: 99.9 % zeros, ~1e-10
        ref = reference_features(r.weights_file, reference_frames(tiny_dataset / d.videos[0]), c.frame_spec)
        np.testing.assert_allclose(d.video(0).astype(np.float32), ref, rtol=3e-3, atol=3e-3 * np.abs(ref).max())
    # the saved backbone is accepted as --weights PATH for the same cache (same identity)
    r2 = extract_features(config(tiny_dataset, out, r.weights_file), progress=False)
    assert (r2.extracted, r2.reused) == (0, 6)
    # The saved backbone deleted: an extended run would need another calibration, whose features
    # cannot join these. Refused before calibrating, naming the file; nothing new written.
    moved = r.weights_file.rename(tmp_path / "elsewhere.pt")
    before = sorted(tmp_path.iterdir())
    with pytest.raises(ConfigError, match=rf"^the cache {out} was made with the recalibrated backbone "
                                          rf"{r.weights_file} \(sha256 {r.weights.sha256[:12]}\), which is missing: "
                                          "restore that file to extend it, or use --overwrite to start over"):
        extract_features(config(tiny_dataset, out, "none", calibration_frames=32), progress=False)
    assert sorted(tmp_path.iterdir()) == before
    moved.rename(r.weights_file)
    assert extract_features(config(tiny_dataset, out, "none", calibration_frames=32), progress=False).reused == 6
    # Another --seed or --calibration-frames would make another backbone, whose features cannot join
    # these: refused like other settings (they were ignored, and the summary said "recalibrated").
    for kw, said in (({"seed": 3}, "--seed 0 (here --seed 3)"),
                     ({"calibration_frames": 50}, "--calibration-frames 32 (here --calibration-frames 50)")):
        with pytest.raises(ConfigError, match=rf"^--output {out} was extracted with the recalibrated backbone .* made "
                                              rf"with {re.escape(said)}: rerun with those to extend it, or use "
                                              r"--overwrite \(or another --output\) for a new backbone$"):
            extract_features(config(tiny_dataset, out, "none", **{"calibration_frames": 32, **kw}), progress=False)
    # --overwrite with an unfinished run of the old backbone there: a new backbone (it was refused,
    # with advice to use the --overwrite it had)
    other = tmp_path / "g.h5"
    part = Path(f"{other}.partial")  # what an interrupted first run with that backbone leaves
    part.mkdir()
    (part / "meta.json").write_text(json.dumps({"provenance": read_provenance(out).to_dict(), "replace": False}))
    with pytest.raises(ConfigError, match=rf"^--output {other} was extracted with the recalibrated backbone "):
        extract_features(config(tiny_dataset, other, "none", calibration_frames=32, seed=3), progress=False)
    r3 = extract_features(config(tiny_dataset, other, "none", calibration_frames=32, seed=3, overwrite=True),
                          progress=False)
    assert r3.weights.sha256 != r.weights.sha256 and r3.extracted == 6 and not part.exists()


def test_weights_none_features_do_not_depend_on_the_batch_size(tiny_dataset, tmp_path):
    """--batch-size sets decoding and the forward only: BatchNorm is calibrated in batches of its own
    fixed size (a batch's variance leaves out the variance between batches), so two runs that differ
    only in --batch-size save the same backbone and cache the same features."""
    write_frames(tiny_dataset / "train" / "run" / "r_long", rand_frames(np.random.default_rng(5), 60), ".png")
    runs = [extract_features(config(tiny_dataset, tmp_path / f"b{b}.h5", "none", calibration_frames=200,
                                    batch_size=b, chunk_frames=b), progress=False) for b in (4, 16)]
    assert runs[0].weights.sha256 == runs[1].weights.sha256
    a, b = (torch.load(r.weights_file, map_location="cpu", weights_only=True) for r in runs)
    assert a["meta"]["calibration_frames"] > 64  # more than one calibration batch
    assert all(torch.equal(a["backbone_state"][k], b["backbone_state"][k]) for k in a["backbone_state"])
    with FeatureCache(runs[0].output) as c0, FeatureCache(runs[1].output) as c1:
        # to a float16 step: another batch size can take another convolution kernel (with one
        # thread, 0.8 % of the values rounded to the next float16)
        np.testing.assert_allclose(c0.load_split("train").features.astype(np.float32),
                                   c1.load_split("train").features.astype(np.float32), rtol=2e-3, atol=1e-4)


def test_other_backbone_refused_before_calibrating_and_replaced_with_its_own(tiny_dataset, tmp_path, monkeypatch):
    """A cache or an unfinished run of another backbone (or FrameSpec) in --output: refused before
    any calibration, nothing written; with --overwrite, the new backbone is calibrated afresh, never
    the one the old run saved."""
    import pipeline.extract as E
    from pipeline.cache import CacheWriter

    calibrations = []
    calibrate = E._calibrate
    monkeypatch.setattr(E, "_calibrate", lambda net, *a: calibrations.append(type(net).__name__) or calibrate(net, *a))

    def run(out: Path, **kw):
        return extract_features(config(tiny_dataset, out, "none", calibration_frames=8, **kw), progress=False)

    def killed_run(out: Path, **kw) -> Path:  # every video stored as a part, killed before the file is written
        with monkeypatch.context() as m:
            m.setattr(CacheWriter, "finalize", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
            with pytest.raises(KeyboardInterrupt):
                run(out, **kw)
        return Path(E.read_partial(out)["provenance"].weights.path)

    done = tmp_path / "done.h5"
    run(done)
    files, before, calibrations[:] = sorted(tmp_path.iterdir()), sha256_file(done), []
    with pytest.raises(CacheError, match=r'done\.h5 was made with different settings \(backbone "mobilenet_v2" vs '
                                         r'"resnet18"\).*--overwrite'):
        run(done, backbone="resnet18")
    assert (calibrations, sorted(tmp_path.iterdir()), sha256_file(done)) == ([], files, before)
    # an --overwrite with another backbone, killed: its rerun without --overwrite would replace the
    # cache, so it is refused (it used to go ahead); the cache's own settings are told what to delete
    killed_run(done, backbone="resnet18", overwrite=True)
    with pytest.raises(CacheError, match=r"done\.h5\.partial is an unfinished --overwrite of .*done\.h5, which was made "
                                         r"with different settings .*rerun with --overwrite to finish replacing it"):
        run(done, backbone="resnet18")
    with pytest.raises(CacheError, match=r"done\.h5\.partial was made with different settings .*: an unfinished "
                                         r"extraction replacing .*done\.h5; delete .*done\.h5\.partial to drop it "
                                         r"\(and keep .*done\.h5 as it is\)"):
        run(done)
    assert sha256_file(done) == before
    junk = tmp_path / "junk.h5"  # the same over an HDF5 file that is no cache: only --overwrite replaces it
    killed_run(junk, overwrite=True)
    h5py.File(junk, "w").close()
    with pytest.raises(CacheError, match=r"junk\.h5\.partial is an unfinished --overwrite of .*junk\.h5.*rerun with "
                                         r"--overwrite to finish replacing it"):
        run(junk)
    assert run(done, backbone="resnet18", overwrite=True).backbone == "resnet18"
    calibrations[:] = []

    for kw in ({"backbone": "resnet18"}, {"frame_spec": FrameSpec(size=48)}):
        out = tmp_path / f"killed-{len(calibrations)}.h5"
        old = killed_run(out)
        with pytest.raises(CacheError, match=r"killed-\d\.h5\.partial was made with different settings"):
            run(out, **kw)
        calibrations[:] = []
        r = run(out, overwrite=True, **kw)
        assert calibrations == ["ResNet" if "backbone" in kw else "MobileNetV2"]
        assert r.weights.source == "recalibrated" and r.weights_file != old and old.is_file()
        saved = torch.load(r.weights_file, weights_only=True)
        assert (saved["backbone"], saved["meta"]["frame_spec"]) == (r.backbone, r.frame_spec.to_dict())
        assert r.backbone == kw.get("backbone", "mobilenet_v2")


def test_backbone_that_cannot_take_the_size_is_refused_before_any_work(tiny_dataset, tmp_path):
    import torchvision

    out = tmp_path / "out" / "f.h5"
    torch.save(torchvision.models.vit_b_16(image_size=48).state_dict(), tmp_path / "vit48.pt")  # weights fix the size
    with pytest.raises(ConfigError, match=r"^vit_b_16 cannot take 32x32 frames \(.*\); use --size 48 \(its weights"):
        extract_features(config(tiny_dataset, out, tmp_path / "vit48.pt", backbone="vit_b_16"), progress=False)
    assert list(out.parent.iterdir()) == []  # no backbone file, no unfinished run


def test_recalibration_does_not_depend_on_decoder_threads(tiny_dataset, tmp_path, threads):
    # 4 train videos x 3 frames decoded, 10 kept, in batches of 4: which frames are kept and how they
    # are batched must not depend on which decoder thread finished first.
    sha = {extract_features(config(tiny_dataset, tmp_path / str(i) / "f.h5", "none", calibration_frames=10,
                                   batch_size=4, workers=w), progress=False).weights.sha256
           for i, w in enumerate((0, 3, 3, 3))}
    assert len(sha) == 1


def test_switching_split_definition_does_not_leak(tmp_path, weights_file):
    rng = np.random.default_rng(0)
    root = tmp_path / "hmdb"
    for cls in ("a", "b"):
        for k in range(2):
            write_frames(root / cls / f"{cls}{k}", rand_frames(rng, 3))
    sd = tmp_path / "splits"
    sd.mkdir()
    for cls in ("a", "b"):
        (sd / f"{cls}_test_split1.txt").write_text(f"{cls}0.avi 1\n{cls}1.avi 2\n")
        (sd / f"{cls}_test_split2.txt").write_text(f"{cls}0.avi 2\n{cls}1.avi 1\n")
    out = tmp_path / "f.h5"
    for sid in (1, 2):
        c = config(root, out, weights_file)
        extract_features(ExtractConfig(**{**c.__dict__, "dataset": DatasetSpec(str(root), split_dir=str(sd),
                                                                                split_id=sid)}), progress=False)
    with FeatureCache(out) as cache:
        assert cache.load_split("train").videos == ["a/a1", "b/b1"]
        assert cache.load_split("test").videos == ["a/a0", "b/b0"]
    # Only the test split of split 1 now: the train split it would keep is split 2's, whose videos
    # are split 1's test videos. Refused before any work, the cache untouched.
    before = sha256_file(out)
    c = config(root, out, weights_file)
    only_test = ExtractConfig(**{**c.__dict__, "dataset": DatasetSpec(str(root), split_dir=str(sd), split_id=1,
                                                                      splits=("test",))})
    with pytest.raises(CacheError, match=r"split 'train', which --splits leaves as it is, holds 2 video\(s\) the "
                                         r"dataset no longer has in it \(e\.g\. 'a/a1'.*rerun without --splits"):
        extract_features(only_test, progress=False)
    assert sha256_file(out) == before and not Path(f"{out}.partial").exists()
    # A split no longer on disk is not one --splits keeps: the run drops it, with a warning.
    with h5py.File(out, "r") as f, h5py.File(tmp_path / "extra.h5", "w") as g:
        for k in f:
            f.copy(f[k], g, name=k)
        f.copy(f["test"], g, name="gone")
        g.attrs.update(dict(f.attrs))
    extract_features(ExtractConfig(**{**only_test.__dict__, "output": str(tmp_path / "extra.h5"), "dataset": DatasetSpec(
        str(root), split_dir=str(sd), split_id=2, splits=("test",))}), progress=False)
    with FeatureCache(tmp_path / "extra.h5") as cache:
        assert sorted(cache.splits) == ["test", "train"]
    # Only the test split of split 2, whose train split is the one cached: nothing to do, and the
    # file is left as it is.
    extract_features(ExtractConfig(**{**only_test.__dict__, "dataset": DatasetSpec(
        str(root), split_dir=str(sd), split_id=2, splits=("test",))}), progress=False)
    assert sha256_file(out) == before


def test_rerun_drops_deleted_videos_and_splits(tiny_dataset, tmp_path, weights_file, caplog):
    """A rerun with nothing new to extract still brings the cache in line with the dataset."""
    import shutil

    (tiny_dataset / "val" / "walk").mkdir(parents=True)
    shutil.copytree(tiny_dataset / "train" / "walk" / "w2", tiny_dataset / "val" / "walk" / "w9")
    out = tmp_path / "f.h5"
    extract_features(config(tiny_dataset, out, weights_file), progress=False)
    shutil.rmtree(tiny_dataset / "train" / "walk" / "w1")
    shutil.rmtree(tiny_dataset / "val")
    r = extract_features(config(tiny_dataset, out, weights_file), progress=False)
    assert (r.extracted, r.reused) == (0, 5) and r.videos == {"train": 3, "test": 2}
    assert "dropped 1 cached video(s) of split 'train'" in caplog.text
    assert "dropped split 'val' of the cache (1 video(s))" in caplog.text
    with FeatureCache(out) as c:
        assert c.load_split("train").videos == ["train/run/r1", "train/run/r2.mkv", "train/walk/w2"]
    fresh = tmp_path / "fresh.h5"
    extract_features(config(tiny_dataset, fresh, weights_file), progress=False)
    assert_same_cache(out, fresh)
    before = sha256_file(out)  # in line now: the next rerun leaves the file as it is
    extract_features(config(tiny_dataset, out, weights_file), progress=False)
    assert sha256_file(out) == before


def test_a_rerun_checks_once_what_an_earlier_version_cached_of_video_files(tmp_path, weights_file, caplog,
                                                                          monkeypatch):
    """An earlier version read a phone video sideways and numbered a cut clip's frames from its
    first packet. A rerun checks each video file it cached (a demux and one decoded frame), extracts
    again exactly those whose rows would differ now, keeps the others, and stores them with this
    version's signature so that no later run checks them again."""
    import pipeline.extract as E
    from pipeline.cache import video_checksum

    rng = np.random.default_rng(5)
    root = tmp_path / "ds"
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
    write_rotated_mp4(root / "train" / "a" / "phone.mp4", rand_frames(rng, 6, 32, 64), -90)
    write_video(root / "train" / "a" / "flat.mp4", rand_frames(rng, 6))
    write_video(root / "train" / "b" / "clip.mkv", rand_frames(rng, 6))
    write_frames(root / "train" / "b" / "folder", rand_frames(rng, 6))
    out = tmp_path / "f.h5"
    extract_features(config(root, out, weights_file), progress=False)
    checks = []
    real = E.read_as_recorded
    monkeypatch.setattr(E, "read_as_recorded", lambda path, *a: checks.append(path.name) or real(path, *a))

    def as_earlier_version(drop_sources: bool = False) -> None:
        with h5py.File(out, "a") as f:
            g = f["train"]
            videos = [v.decode() for v in g["videos"][()]]
            if drop_sources:  # a version before sources were recorded
                del g["sources"]
                return
            g["sources"][...] = np.asarray([s.decode().removesuffix(" upright") for s in g["sources"][()]], dtype=object)
            i = videos.index("train/b/clip.mkv")  # numbered as if cut: 3 frames from its first packet
            a, b = g["offsets"][i], g["offsets"][i + 1]
            g["frame_indices"][a:b] = g["frame_indices"][a:b] + 3
            g["checksums"][i] = video_checksum(g["features"][a:b], g["frame_indices"][a:b])

    as_earlier_version()
    r = extract_features(config(root, out, weights_file), progress=False)
    assert (r.extracted, r.reused) == (2, 2) and sorted(checks) == ["clip.mkv", "flat.mp4", "phone.mp4"]
    assert "2 of 3 video file(s) cached by an earlier version come out otherwise now" in caplog.text
    assert "changed on disk" not in caplog.text
    with h5py.File(out) as f:
        assert sum(s.decode().endswith(" upright") for s in f["train"]["sources"][()]) == 3  # the files, re-signed
    before, checks[:] = sha256_file(out), []
    r = extract_features(config(root, out, weights_file), progress=False)
    assert (r.extracted, r.reused, checks) == (0, 4, []) and sha256_file(out) == before
    fresh = tmp_path / "fresh.h5"
    extract_features(config(root, fresh, weights_file), progress=False)
    assert_same_cache(out, fresh)
    as_earlier_version(drop_sources=True)  # a version that recorded no sources read phones sideways too
    r = extract_features(config(root, out, weights_file), progress=False)
    assert (r.extracted, r.reused) == (1, 3) and len(checks) == 3  # the phone video again; the folder is trusted
    assert "1 of 3 video file(s) cached by an earlier version" in caplog.text


def test_rerun_redoes_a_video_whose_source_changed(tiny_dataset, tmp_path, weights_file, caplog):
    """A frame deleted from a cached video, or a video file replaced under its name: the rerun
    extracts it again (it kept the old rows, exit 0, no word), and the cache equals a fresh one. A
    touch changes nothing; a cache that predates the record is trusted as before."""
    import os

    import h5py

    out = tmp_path / "f.h5"
    extract_features(config(tiny_dataset, out, weights_file), progress=False)
    for f in tiny_dataset.rglob("*"):  # a copy or a touch of the dataset is no change
        os.utime(f)
    r = extract_features(config(tiny_dataset, out, weights_file), progress=False)
    assert (r.extracted, r.reused) == (0, 6)
    (tiny_dataset / "train" / "walk" / "w1" / "frame_5.png").unlink()
    clip = tiny_dataset / "train" / "run" / "r2.mkv"
    write_video(clip, rand_frames(np.random.default_rng(7), 5))
    r = extract_features(config(tiny_dataset, out, weights_file), progress=False)
    assert (r.extracted, r.reused) == (2, 4)
    assert "2 cached video(s) changed on disk since they were extracted" in caplog.text
    fresh = tmp_path / "fresh.h5"
    extract_features(config(tiny_dataset, fresh, weights_file), progress=False)
    assert_same_cache(out, fresh)
    with h5py.File(out, "a") as f:  # as a cache written before sources were recorded
        for split in f:
            del f[split]["sources"]
    (tiny_dataset / "train" / "walk" / "w1" / "frame_6.png").unlink()
    r = extract_features(config(tiny_dataset, out, weights_file), progress=False)
    assert (r.extracted, r.reused) == (0, 6)


def test_a_changed_video_that_no_longer_decodes_leaves_no_old_rows(tiny_dataset, tmp_path, weights_file, caplog):
    """A cached video file replaced by an undecodable one under its name, a frame folder whose frames
    were all replaced by broken ones, one that gained a second numbered sequence: the rerun fails on
    them, so their old features, of what is no longer there, must not stay in the cache as theirs.
    A video retried for a broken frame whose source did not change keeps its rows, whatever the retry
    met (a read error may pass)."""
    (tiny_dataset / "train" / "run" / "r1" / "frame_2.PNG").write_bytes(b"\x89PNG garbage")
    out = tmp_path / "f.h5"
    extract_features(config(tiny_dataset, out, weights_file), progress=False)
    with FeatureCache(out) as c:
        kept = c.video("train", c.load_split("train").videos.index("train/run/r1"))[0]
    (tiny_dataset / "train" / "run" / "r2.mkv").write_bytes(np.random.default_rng(3).bytes(5000))
    for f in (tiny_dataset / "test" / "walk" / "w3").iterdir():
        f.write_bytes(b"not a png")
    write_frames(tiny_dataset / "train" / "walk" / "w2", rand_frames(np.random.default_rng(4), 2), ".jpg",
                 name="right_{}")  # frame_# and right_#: no one video
    for f in (tiny_dataset / "train" / "run" / "r1").iterdir():  # the same names and sizes: no change seen
        f.write_bytes(b"\0" * f.stat().st_size)
    r = extract_features(config(tiny_dataset, out, weights_file), progress=False)
    assert {f["video"] for f in r.failures if f["skipped"] == "video"} == \
        {"train/run/r2.mkv", "test/walk/w3", "train/walk/w2", "train/run/r1"}
    assert "dropped the cached features of 3 video(s) that changed on disk and could not be extracted again" \
        in caplog.text
    with FeatureCache(out) as c:
        train = c.load_split("train").videos
        assert "train/run/r2.mkv" not in train and "train/walk/w2" not in train
        assert "test/walk/w3" not in c.load_split("test").videos
        np.testing.assert_array_equal(c.video("train", train.index("train/run/r1"))[0], kept)


def test_16bit_png_and_worker_failures_bounded(tiny_dataset, tmp_path, weights_file):
    grey16 = (np.random.default_rng(0).random((24, 32)) * 65535).astype(np.uint16)
    d = tiny_dataset / "train" / "walk" / "deep"
    write_frames(d, rand_frames(np.random.default_rng(1), 1))  # frame_1.png, 8-bit
    Image.fromarray(grey16).save(d / "frame_2.png")  # 16-bit grey
    out = tmp_path / "f.h5"
    r = extract_features(config(tiny_dataset, out, weights_file, workers=1), progress=False)
    assert r.failures == [] and r.videos["train"] == 5


def test_precision_is_part_of_provenance(tiny_dataset, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    extract_features(config(tiny_dataset, out, weights_file), progress=False)
    with pytest.raises(CacheError, match="compute precision"):
        extract_features(config(tiny_dataset, out, weights_file, precision="bf16"), progress=False)


def test_calibration_split_is_never_a_held_out_one():
    from pipeline.extract import _calibration_split

    assert _calibration_split(["Test", "Train"]) == "Train"  # folders named on Windows: sorted, Test came first
    assert _calibration_split(["test", "TRAINING", "val"]) == "TRAINING"
    assert _calibration_split(["Testing", "Validation", "clips"]) == "clips"
    assert _calibration_split(["test", "val1", "dev"]) is None  # the caller warns: it calibrates on a held-out split
    assert _calibration_split(["clips", "train"], train_only=True) == "train"
    assert _calibration_split(["clips"], train_only=True) is None  # --splits clips: train is looked for first


def test_calibration_with_one_frame_and_only_test_split(tiny_dataset, tmp_path):
    out = tmp_path / "f.h5"
    c = config(tiny_dataset, out, "none", calibration_frames=1)
    r = extract_features(ExtractConfig(**{**c.__dict__, "dataset": DatasetSpec(str(tiny_dataset), splits=("test",))}),
                         progress=False)
    assert r.videos == {"test": 2} and r.weights_file.is_file()
    meta = torch.load(r.weights_file, weights_only=True)["meta"]
    assert meta["calibration_frames"] == 2  # at least two: BatchNorm needs a batch


@pytest.mark.parametrize("inline, workers", [(True, 0), (True, 1), (True, 3), (False, 0), (False, 2)])
def test_frame_loaders_deliver_every_frame_once_in_order(tiny_dataset, inline, workers, threads):
    """Threads decoding between batches (the CPU path) and DataLoader processes (the CUDA path)."""
    index = index_dataset(DatasetSpec(str(tiny_dataset)))
    videos = [v for vs in index.splits.values() for v in vs]
    spec = FrameSpec(size=SIZE)
    loader = frame_loader([(i, v.path, v.kind) for i, v in enumerate(videos)], spec, FrameSelection(),
                          chunk_frames=4, workers=workers, device=torch.device("cpu"), batch_size=4, inline=inline)
    frames: dict[int, list[torch.Tensor]] = {}
    indices: dict[int, list[torch.Tensor]] = {}
    finished: set[int] = set()
    assert torch.get_num_threads() == threads
    for c in loader:
        assert c.pos not in finished and c.error is None
        assert c.frames.shape[0] == 0 or c.frames.is_contiguous(memory_format=torch.channels_last)
        frames.setdefault(c.pos, []).append(c.frames)
        indices.setdefault(c.pos, []).append(c.indices)
        if c.last:
            finished.add(c.pos)
    assert finished == set(range(len(videos)))
    # the decoders' one-thread setting did not leak, into this thread nor into threads started later
    assert torch.get_num_threads() == threads and threads_of_a_new_thread() == threads
    for i, v in enumerate(videos):
        ref = [resize_frames(f, spec) for f in read_frames(v.path, v.kind,
                                                           selected_positions(v.path, v.kind, FrameSelection()))]
        assert torch.equal(torch.cat(frames[i]), torch.stack(ref)), v.rel
        assert torch.cat(indices[i]).tolist() == list(range(len(ref)))


def test_inline_decoder_stopped_early_restores_threads(tiny_dataset, threads):
    videos = [v for vs in index_dataset(DatasetSpec(str(tiny_dataset))).splits.values() for v in vs]
    it = iter(frame_loader([(i, v.path, v.kind) for i, v in enumerate(videos)], FrameSpec(size=SIZE),
                           FrameSelection(), chunk_frames=2, workers=2, device=torch.device("cpu"), batch_size=2))
    assert next(it).frames.shape[0] > 0
    it.close()  # a consumer that stops early (an error downstream, Ctrl-C)
    assert torch.get_num_threads() == threads and threads_of_a_new_thread() == threads
    assert not [t for t in threading.enumerate() if t.name.startswith("decode")]


def test_inline_decoder_errors_reach_the_caller(tiny_dataset):
    videos = [v for vs in index_dataset(DatasetSpec(str(tiny_dataset))).splits.values() for v in vs]
    loader = frame_loader([(i, v.path, v.kind) for i, v in enumerate(videos)], FrameSpec(size=SIZE),
                          FrameSelection(fps=5.0), chunk_frames=4, workers=2, device=torch.device("cpu"),
                          batch_size=4)
    with pytest.raises(ConfigError, match="--folder-fps"):
        list(loader)


def test_decoder_threads_do_not_change_the_cache(tiny_dataset, tmp_path, weights_file, threads):
    # (at two model threads: the decoders resize at one, the model's thread at two)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract_features(config(tiny_dataset, a, weights_file, workers=0), progress=False)
    extract_features(config(tiny_dataset, b, weights_file, workers=3, chunk_frames=2), progress=False)
    assert_same_cache(a, b)


def test_interrupted_run_with_ignored_names_resumes_to_the_same_cache(tiny_dataset, tmp_path, weights_file,
                                                                       monkeypatch):
    from pipeline.cache import CacheWriter

    walk = tiny_dataset / "train" / "walk"
    os.rename(walk / "w1" / "frame_3.png", os.fsencode(walk / "w1") + b"/fr\xe9me_3.png")
    os.rename(walk / "w2", os.fsencode(walk) + b"/vid\xe9o")
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    extract_features(config(tiny_dataset, a, weights_file), progress=False)

    def killed(self, *args, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # every video done, killed before the cache file is written
        m.setattr(CacheWriter, "finalize", killed)
        with pytest.raises(KeyboardInterrupt):
            extract_features(config(tiny_dataset, b, weights_file), progress=False)
    r = extract_features(config(tiny_dataset, b, weights_file), progress=False)
    assert (r.extracted, r.reused) == (0, 5) and len(r.failures) == 2
    assert_same_cache(a, b)
    r = extract_features(config(tiny_dataset, b, weights_file), progress=False)
    assert (r.extracted, r.reused) == (0, 5)  # the video with a left-out frame is not redone
    with FeatureCache(b) as c:
        assert {(f["video"], f["skipped"]) for f in c.failures} == {("train/walk/w1", "name"),
                                                                    ("train/walk/vid\\xe9o", "name")}


@pytest.mark.parametrize("inline, workers", [(True, 2), (False, 1)])
def test_truncated_video_reaches_the_runner_as_skipped_frames(tmp_path, inline, workers):
    """Both loaders (threads on CPU, DataLoader processes on CUDA) carry what a frame error skipped."""
    from conftest import cut_file, write_faststart_mp4

    video = tmp_path / "cut.mp4"
    write_faststart_mp4(video, rand_frames(np.random.default_rng(0), 60))
    cut_file(video, video.stat().st_size // 2)
    loader = frame_loader([(0, video, "file")], FrameSpec(size=SIZE), FrameSelection(), chunk_frames=4,
                          workers=workers, device=torch.device("cpu"), batch_size=4, inline=inline)
    chunks = list(loader)
    errors = [(c.skipped, c.error) for c in chunks if c.error is not None]
    assert len(errors) == 1 and errors[0][0] == "frames" and "truncated: decoded" in errors[0][1]
    assert not any(c.fatal for c in chunks) and sum(c.frames.shape[0] for c in chunks) > 10


def test_interrupted_run_redoes_a_stored_video_whose_frame_broke(tiny_dataset, tmp_path, weights_file, monkeypatch):
    """A video stored with a broken frame is done again on the next run, also when that run
    resumes from the parts of one killed before the cache file was written: a repaired frame
    must reach the cache."""
    from pipeline.cache import CacheWriter

    frame = tiny_dataset / "train" / "walk" / "w1" / "frame_4.png"
    good = frame.read_bytes()
    frame.write_bytes(b"")
    out = tmp_path / "f.h5"

    def killed(self, *args, **kw):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:  # every video stored as a part, killed before the file is written
        m.setattr(CacheWriter, "finalize", killed)
        with pytest.raises(KeyboardInterrupt):
            extract_features(config(tiny_dataset, out, weights_file), progress=False)
    frame.write_bytes(good)
    r = extract_features(config(tiny_dataset, out, weights_file), progress=False)
    assert (r.extracted, r.failures) == (1, [])  # w1 again, the other videos from their parts
    with FeatureCache(out) as c:
        data = c.load_split("train")
        i = data.videos.index("train/walk/w1")
        assert list(data.frame_indices[data.offsets[i]:data.offsets[i + 1]]) == list(range(12))
    extract_features(config(tiny_dataset, tmp_path / "fresh.h5", weights_file), progress=False)
    assert_same_cache(out, tmp_path / "fresh.h5")  # as if nothing had happened


def test_one_extraction_per_cache(tiny_dataset, tmp_path, weights_file):
    """A second extraction into a cache that one is writing is refused with the writer's pid; the
    lock file goes when the writer is done."""
    from pipeline.files import OutputInUseError, exclusive

    out = tmp_path / "f.h5"
    with exclusive(out, "--output"):
        with pytest.raises(OutputInUseError,
                           match=rf"^--output {out} is in use by another process \(pid {os.getpid()} on "):
            extract_features(config(tiny_dataset, out, weights_file), progress=False)
        assert not out.exists() and not Path(f"{out}.partial").exists()
    assert not Path(f"{out}.lock").exists()
    extract_features(config(tiny_dataset, out, weights_file), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "f.h5"]  # no lock file, no partial run left


def test_features_of_another_width_than_recorded_are_never_stored(tmp_path):
    """A timm model whose width was misjudged (288 for 1024) had its cache written whole, over a
    good one, then refused on reading: a video's features must fit the provenance to be stored."""
    from synthetic import provenance

    from pipeline.cache import CacheWriter, VideoRecord

    writer = CacheWriter(tmp_path / "w.h5", provenance(["a"], 4), replace=True)
    writer.add("train", VideoRecord("a/v0", 0, np.ones((3, 4), np.float16), np.arange(3), 25.0))
    with pytest.raises(CacheError, match=r"the features of a/v1 are of shape \(3, 5\), not \(frames, 4\)"):
        writer.add("train", VideoRecord("a/v1", 0, np.ones((3, 5), np.float16), np.arange(3), 25.0))
    assert len(list((tmp_path / "w.h5.partial" / "train").glob("*.npz"))) == 1  # a/v0's alone


def test_auto_precision_goes_on_in_the_precision_a_cache_was_made_in(tmp_path, caplog):
    """`--precision auto` chose bf16 on a V100 or T4 until it chose fp16 there: the same command
    then refused to resume or extend what it had made ('compute precision "bfloat16" vs
    "float16"'). auto now goes on in the recorded autocast dtype; --overwrite starts afresh."""
    import dataclasses
    import logging

    from synthetic import provenance

    from pipeline.cache import CacheWriter, VideoRecord, write_cache
    from pipeline.extract import _as_recorded

    cuda = torch.device("cuda")  # only its type is read: no GPU needed
    bf16 = dataclasses.replace(provenance(["a"], 4), precision="bfloat16")
    rec = VideoRecord("a/v0", 0, np.ones((3, 4), np.float16), np.arange(3), 25.0)
    write_cache(tmp_path / "c.h5", bf16, {"train": [rec]})

    def cfg(out: str, **kw) -> ExtractConfig:
        return ExtractConfig(dataset=DatasetSpec(root=str(tmp_path)), output=str(tmp_path / out), **kw)

    with caplog.at_level(logging.INFO):
        assert _as_recorded(cfg("c.h5"), tmp_path / "c.h5", cuda, torch.float16) == torch.bfloat16
    assert "--precision auto: " in caplog.text and "made under bfloat16 autocast, and goes on so" in caplog.text
    assert _as_recorded(cfg("c.h5", overwrite=True), tmp_path / "c.h5", cuda, torch.float16) == torch.float16
    assert _as_recorded(cfg("c.h5", precision="fp16"), tmp_path / "c.h5", cuda, torch.float16) == torch.float16
    assert _as_recorded(cfg("c.h5"), tmp_path / "c.h5", torch.device("cpu"), None) is None
    assert _as_recorded(cfg("new.h5"), tmp_path / "new.h5", cuda, torch.float16) == torch.float16
    # an unfinished run: its work folder's record, also for the --overwrite that made it
    CacheWriter(tmp_path / "w.h5", bf16, replace=True).add("train", rec)
    for overwrite in (False, True):
        assert _as_recorded(cfg("w.h5", overwrite=overwrite), tmp_path / "w.h5", cuda, torch.float16) == torch.bfloat16
