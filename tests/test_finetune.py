"""Stage three: end-to-end fine-tuning, frozen parts stay frozen, torchrun with 2 CPU processes."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import REPO, SIZE, calibrated_backbone_file, write_frames
from test_extract import assert_same_cache

from pipeline.checkpoint import load_checkpoint
from pipeline.config import DatasetSpec, ExtractConfig, FinetuneConfig, FrameSpec, TemporalConfig
from pipeline.errors import ConfigError, DataError, WeightsError
from pipeline.extract import extract_features
from pipeline.finetune import finetune
from pipeline.model import load_model
from pipeline.predict import Predictor
from pipeline.train import train_temporal

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    """Three classes told apart by colour (learnable by the CNN at 32 px), noisy frames."""
    root = tmp_path_factory.mktemp("colours") / "ds"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for cls, rgb in COLOURS.items():
            for k in range(n):
                frames = [np.clip(np.array(rgb) + rng.normal(0, 40, (24, 32, 3)), 0, 255).astype(np.uint8)
                          for _ in range(6)]
                write_frames(root / split / cls / f"{cls}_{split}_{k}", frames, ".png")
    return root


def ft_cfg(root: Path, out: Path, weights: Path, **kw) -> FinetuneConfig:
    base = dict(weights=str(weights), frame_spec=FrameSpec(size=SIZE), hidden=16, seq_len=4, epochs=3,
                batch_size=6, lr=3e-3, backbone_lr=1e-3, workers=0, device="cpu", dropout=0.1)
    return FinetuneConfig(dataset=DatasetSpec(str(root)), out=str(out), **{**base, **kw})


def test_finetune_learns(colour_data, tmp_path, weights_file, monkeypatch, plots_drawn):
    import pipeline.run as run_mod
    monkeypatch.setattr(run_mod, "PLOT_EVERY_S", 3600.0)
    r = finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=6, trainable_blocks=2), progress=False)
    losses = [h["train_loss"] for h in r.history]
    assert losses[-1] < losses[0]
    assert r.best["top1"] >= 0.66  # chance 1/3
    ck = load_checkpoint(tmp_path / "run" / "best.pt", kind="end_to_end")
    assert {"backbone_state", "model_state", "frame_spec", "classes", "cache"} <= set(ck)
    # the plots are finished at the end: drawn at epoch 1 and then (PLOT_EVERY_S not reached) only there
    assert plots_drawn == [("confusion", 1), ("curves", 1), ("curves", 6), ("confusion", ck["epoch"])]
    # the model rebuilt from it has the fine-tuned backbone, not the one it started from
    rebuilt = load_model(tmp_path / "run" / "best.pt").backbone().net.state_dict()
    assert_states_close(rebuilt, ck["backbone_state"], atol=0)
    assert any(not torch.equal(rebuilt[k], v) for k, v in _backbone(weights_file).items())
    res = extract_features(ExtractConfig(dataset=DatasetSpec(str(colour_data)), output=str(tmp_path / "re.h5"),
                                         weights=str(tmp_path / "run" / "best.pt"), frame_spec=FrameSpec(size=SIZE),
                                         workers=0, batch_size=8), progress=False)
    assert res.weights.source == "file" and res.videos == {"train": 24, "val": 9}
    from pipeline.train import evaluate_checkpoint

    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", tmp_path / "re.h5", "val", device="cpu")
    assert ev.metrics["top1"] >= 0.66  # the head on its own backbone's cached features
    # predict takes the checkpoint alone: evaluate's probabilities, up to the cache's float16
    # rounding of the features (the checkpoint's own are float32)
    preds = Predictor(tmp_path / "run" / "best.pt", device="cpu", workers=0).predict(
        [colour_data / v for v in ev.videos], progress=False)
    for p, want in zip(preds, ev.probs):
        assert p.error is None
        np.testing.assert_allclose(p.probs, want, rtol=0, atol=1e-3)


def test_test_pass_is_the_picked_model_and_writes_train_temporals_files(colour_data, tmp_path, weights_file):
    """The single test pass evaluates best.pt and writes test.json, confusion_test.png and
    per_class_test.csv, as train-temporal does. With the validation videos as the test split, it
    must score exactly what the best epoch scored in validation."""
    import csv
    import json

    root = tmp_path / "ds"
    for split, src in (("train", "train"), ("val", "val"), ("test", "val")):
        shutil.copytree(colour_data / src, root / split)
    r = finetune(ft_cfg(root, tmp_path / "run", weights_file, epochs=2, trainable_blocks=1), progress=False)
    run = tmp_path / "run"
    test = json.loads((run / "test.json").read_text())
    assert r.test_split == "test" and test["picked_on"] == "split 'val'" and test["epoch"] == r.best_epoch
    assert test["top1"] == r.test["top1"] == r.best["top1"] and test["loss"] == pytest.approx(r.best["loss"], rel=1e-6)
    with open(run / "per_class_test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["class"] for row in rows] == r.classes and [int(row["support"]) for row in rows] == [3, 3, 3]
    assert [float(row["accuracy"]) for row in rows] == pytest.approx(test["per_class_acc"], abs=5e-5)
    assert (run / "confusion_test.png").read_bytes().startswith(b"\x89PNG")


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-8) -> None:
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=atol, msg=k)


def _backbone(path: Path) -> dict[str, torch.Tensor]:
    ck = torch.load(path, weights_only=True)
    return ck["backbone_state"] if "backbone_state" in ck else {f"features.{k}" if not k.startswith("features.")
                                                                 else k: v for k, v in ck.items()}


def test_freeze_cnn_keeps_every_backbone_tensor(colour_data, tmp_path, weights_file):
    finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, freeze_cnn=True, epochs=1), progress=False)
    before, after = _backbone(weights_file), _backbone(tmp_path / "run" / "last.pt")
    assert_states_close(after, before, atol=0)  # weights and BatchNorm running statistics alike
    # with --trainable-blocks too: one of the two is a mistake (the freeze used to win, silently)
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="--freeze-cnn trains no block of the backbone, --trainable-blocks 2 asks"):
        finetune(ft_cfg(colour_data, tmp_path / "both", weights_file, freeze_cnn=True, trainable_blocks=2),
                 progress=False)
    assert not (tmp_path / "both").exists()


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_frozen_backbone_computes_the_extracted_features_in_training(name):
    """With every block frozen, train mode gives the eval-mode features: the classifier's dropout,
    which has no parameters and sits in no block, used to stay in training mode."""
    from pipeline.backbones import create_backbone
    from pipeline.finetune import EndToEnd
    from pipeline.heads import HeadConfig, build_head

    from pipeline.backbones import recalibrate_batchnorm
    from pipeline.preprocess import normalize_frames

    torch.manual_seed(0)
    bb = create_backbone(name, "none")
    spec = FrameSpec(size=SIZE)
    recalibrate_batchnorm(bb.net, [normalize_frames(torch.randint(0, 256, (16, 3, SIZE, SIZE), dtype=torch.uint8), spec)])
    head = build_head(HeadConfig(num_classes=3, input_dim=bb.num_features, hidden=8))
    model = EndToEnd(bb, head, spec, trainable_blocks=0).train()
    clips, lengths = torch.randint(0, 256, (2, 3, 3, SIZE, SIZE), dtype=torch.uint8), torch.tensor([3, 2])
    with torch.no_grad():
        train = model.features(clips, lengths)
        assert (train[0] != 0).float().mean() > 0.25  # features, not a degenerate network's zeros
        model.eval()
        assert torch.equal(train, model.features(clips, lengths))
    model.train()
    assert model.head.training and not any(m.training for m in model.backbone.modules())


def test_evaluation_averages_each_video_over_the_clips_that_decode(colour_data, tmp_path, monkeypatch):
    """A clip that fails to decode is left out of its video's average, which stays a distribution
    (it used to count as zeros: probabilities summing to 1/2 here, and a larger NLL)."""
    from pipeline.backbones import create_backbone
    from pipeline.config import FrameSelection
    from pipeline.data import index_dataset
    from pipeline.distributed import DistInfo
    from pipeline.finetune import ClipDataset, EndToEnd, _evaluate
    from pipeline.heads import HeadConfig, build_head

    real = ClipDataset._clip
    monkeypatch.setattr(ClipDataset, "_clip", lambda self, i: None if (self.clip, i) == (1, 0) else real(self, i))
    bb = create_backbone("mobilenet_v2", "none")
    model = EndToEnd(bb, build_head(HeadConfig(num_classes=3, input_dim=bb.num_features, hidden=8)),
                     FrameSpec(size=SIZE), trainable_blocks=0)
    videos = index_dataset(DatasetSpec(str(colour_data))).videos("val")
    cfg = ft_cfg(colour_data, tmp_path / "run", tmp_path / "unused.pt", eval_clips=2)
    probs, labels = _evaluate(model, videos, FrameSpec(size=SIZE), FrameSelection(), cfg, torch.device("cpu"),
                              DistInfo(), {"num_workers": 0})
    assert len(probs) == len(videos) == 9
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)


def test_trainable_blocks_change_only_those(colour_data, tmp_path, weights_file):
    finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, trainable_blocks=2, epochs=1), progress=False)
    before, after = _backbone(weights_file), _backbone(tmp_path / "run" / "last.pt")
    changed = {int(k.split(".")[1]) for k in before if not torch.equal(before[k], after[k])}
    assert changed == {17, 18}


def test_init_from_stage_two_and_incompatible_init(colour_data, tmp_path, weights_file):
    cache = tmp_path / "f.h5"
    extract_features(ExtractConfig(dataset=DatasetSpec(str(colour_data)), output=str(cache), weights=str(weights_file),
                                   frame_spec=FrameSpec(size=SIZE), workers=0, batch_size=8), progress=False)
    train_temporal(TemporalConfig(cache=str(cache), out=str(tmp_path / "s2"), hidden=16, epochs=2, seq_len=4,
                                  device="cpu"), progress=False)
    # a frozen backbone and a learning rate too small to move the head: what --init started from shows
    still = dict(epochs=1, batch_size=6, workers=0, device="cpu", freeze_cnn=True, lr=1e-12)
    r = finetune(FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out=str(tmp_path / "e2e"),
                                init=str(tmp_path / "s2" / "best.pt"), **still), progress=False)
    ck = load_checkpoint(tmp_path / "e2e" / "best.pt")
    assert ck["train_config"]["seq_len"] == 4 and ck["frame_spec"]["size"] == SIZE and r.best_epoch == 1
    assert ck["train_config"]["hidden"] == 16 == ck["model_config"]["hidden"]  # the --init head's, not the default
    s2 = load_checkpoint(tmp_path / "s2" / "best.pt")
    assert_states_close(ck["model_state"], s2["model_state"])  # the stage-two head
    assert_states_close(ck["backbone_state"], _backbone(weights_file), atol=0)  # the backbone its features came from
    from pipeline.errors import CacheError
    from pipeline.train import evaluate_checkpoint

    with pytest.raises(CacheError, match=r"evaluate on a cache extracted with extract-features --weights .*e2e/best\.pt"):
        evaluate_checkpoint(tmp_path / "e2e" / "best.pt", cache, "val", device="cpu")  # names its own backbone
    # and from an end-to-end checkpoint: its backbone and head
    finetune(FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out=str(tmp_path / "e2e2"),
                            init=str(tmp_path / "e2e" / "best.pt"), **still), progress=False)
    ck2 = load_checkpoint(tmp_path / "e2e2" / "best.pt")
    assert_states_close(ck2["model_state"], ck["model_state"])
    assert_states_close(ck2["backbone_state"], ck["backbone_state"], atol=0)
    # the backbone file the stage-two checkpoint recorded has moved: --weights says where it is now
    moved = tmp_path / "moved.pt"
    shutil.copy(weights_file, moved)
    s2 = torch.load(tmp_path / "s2" / "best.pt", weights_only=True)
    s2["cache"]["weights"]["path"] = str(tmp_path / "gone.pt")
    torch.save(s2, tmp_path / "s2-moved.pt")
    with pytest.raises(WeightsError, match="pass --weights PATH"):
        finetune(FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out=str(tmp_path / "m0"),
                                init=str(tmp_path / "s2-moved.pt"), **still), progress=False)
    finetune(FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out=str(tmp_path / "m1"),
                            init=str(tmp_path / "s2-moved.pt"), weights=str(moved), **still), progress=False)
    assert_states_close(load_checkpoint(tmp_path / "m1" / "best.pt")["backbone_state"], _backbone(weights_file), atol=0)
    with pytest.raises(ConfigError, match="holds its own fine-tuned backbone; drop --weights"):
        finetune(FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out=str(tmp_path / "m2"),
                                init=str(tmp_path / "e2e" / "best.pt"), weights=str(moved), **still), progress=False)
    with pytest.raises(ConfigError, match="FrameSpec"):
        finetune(FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out=str(tmp_path / "x"),
                                init=str(tmp_path / "s2" / "best.pt"), frame_spec=FrameSpec(size=48), workers=0,
                                device="cpu"), progress=False)
    # the head comes from --init with its weights: asking for another one is refused (it used to be
    # dropped with an INFO line), from the command line too, where the shown defaults ask for nothing
    from click.testing import CliRunner

    from cli import main

    args = ["finetune-end-to-end", "--data-dir", str(colour_data), "--init", str(tmp_path / "s2" / "best.pt"),
            "--epochs", "1", "--batch-size", "6", "--workers", "0", "--device", "cpu", "--freeze-cnn", "--no-progress"]
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "h1"), "--head", "gru", "--hidden", "32"])
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"error: --head gru, --hidden 32: the head comes from --init {tmp_path / 's2' / 'best.pt'}, with its weights, "
        "and is --head lstm, --hidden 16; drop --head etc., or start without --init"), r.stderr
    r = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "h2"), "--hidden", "16", "--bidirectional",
                                  "--num-heads", "8"])  # an LSTM has no attention heads: nothing asked of it
    assert r.exit_code == 0, r.stderr  # what --init has is no conflict, nor are the defaults it does not
    assert "--num-heads: the lstm head of --init does not use it" in r.stderr  # but it is said
    assert load_checkpoint(tmp_path / "h2" / "best.pt")["model_config"] == s2["model_config"]
    other = tmp_path / "other"
    for cls in ("cyan", "magenta"):
        for split in ("train", "val"):
            write_frames(other / split / cls / f"{cls}{split}", [np.zeros((24, 32, 3), np.uint8)] * 3)
    with pytest.raises(ConfigError, match="other classes"):
        finetune(FinetuneConfig(dataset=DatasetSpec(str(other)), out=str(tmp_path / "y"),
                                init=str(tmp_path / "s2" / "best.pt"), workers=0, device="cpu"), progress=False)


def test_init_trained_on_the_test_or_validation_videos_is_said(tmp_path, weights_file, caplog):
    """HMDB51's splits share videos: split 2's test videos are split 1's training videos. A run
    started from --init trained on split 1 reports split 2's test numbers with a warning, in
    test.json and again from evaluate; validating on videos --init was trained on is refused. What
    --init was trained on is read from its cache (train-temporal) or its dataset (end-to-end)."""
    import json
    import logging

    from pipeline.train import evaluate_checkpoint

    root, splits = tmp_path / "hmdb", tmp_path / "splits"
    rng = np.random.default_rng(0)
    for cls, rgb in COLOURS.items():
        for k in range(6):
            write_frames(root / cls / f"{cls}_v{k}", [np.clip(np.array(rgb) + rng.normal(0, 40, (24, 32, 3)), 0, 255)
                                                     .astype(np.uint8) for _ in range(4)], ".png")
        splits.mkdir(exist_ok=True)  # split 1: train v0-v1, test v4-v5; split 2: train v2-v5, test v0-v1
        (splits / f"{cls}_test_split1.txt").write_text("".join(f"{cls}_v{k}.avi {t}\n" for k, t in
                                                              enumerate((1, 1, 0, 0, 2, 2))))
        (splits / f"{cls}_test_split2.txt").write_text("".join(f"{cls}_v{k}.avi {t}\n" for k, t in
                                                              enumerate((2, 2, 1, 1, 1, 1))))
    split1, split2 = (DatasetSpec(str(root), split_dir=str(splits), split_id=i) for i in (1, 2))
    extract_features(ExtractConfig(dataset=split1, output=str(tmp_path / "s1.h5"), weights=str(weights_file),
                                   frame_spec=FrameSpec(size=SIZE), workers=0, batch_size=8), progress=False)
    train_temporal(TemporalConfig(cache=str(tmp_path / "s1.h5"), out=str(tmp_path / "s2"), hidden=16, epochs=1,
                                  seq_len=4, val_split="test", device="cpu"), progress=False)
    still = dict(epochs=1, batch_size=6, workers=0, device="cpu", freeze_cnn=True, val_fraction=0.5)
    with pytest.raises(ConfigError, match=r"--init .*s2/best\.pt was trained on 6 of the 6 validation videos "
                                          r"\(split 'test': blue/blue_v0, blue/blue_v1, green/green_v0, .*\): the best "
                                          r"epoch would be picked on videos it has seen"):
        finetune(FinetuneConfig(dataset=split2, out=str(tmp_path / "x"), val_split="test",
                                init=str(tmp_path / "s2" / "best.pt"), **still), progress=False)
    with caplog.at_level(logging.WARNING):
        r = finetune(FinetuneConfig(dataset=split2, out=str(tmp_path / "e2e"), init=str(tmp_path / "s2" / "best.pt"),
                                    **still), progress=False)
    note = f"--init {tmp_path / 's2' / 'best.pt'} was trained on 6 of its 6 videos (blue/blue_v0, blue/blue_v1, "
    assert r.test_split == "test" and f"test split 'test': {note}" in caplog.text
    assert json.loads((tmp_path / "e2e" / "test.json").read_text())["seen"].startswith(note)
    from pipeline.run import seen_among  # its checkpoint counts them among what it was trained on, for a split
    some = [f"{c}/{c}_v0" for c in sorted(COLOURS)]  # holding only some of them (evaluate's count)
    assert seen_among(load_checkpoint(tmp_path / "e2e" / "best.pt")["seen_videos"], some) == (len(COLOURS), 0)
    # evaluate says it too, on a cache of the fine-tuned backbone's features of those videos
    extract_features(ExtractConfig(dataset=split2, output=str(tmp_path / "re.h5"),
                                   weights=str(tmp_path / "e2e" / "best.pt"), frame_spec=FrameSpec(size=SIZE), workers=0,
                                   batch_size=8), progress=False)
    assert evaluate_checkpoint(tmp_path / "e2e" / "best.pt", tmp_path / "re.h5", "test", device="cpu").seen \
        .startswith(note)
    # an end-to-end --init: what it was trained on is its dataset's split 2 training videos, less its carve
    held = set(load_checkpoint(tmp_path / "e2e" / "best.pt")["validation"]["videos"])
    trained = [f"{c}/{c}_v{k}" for c in sorted(COLOURS) for k in (4, 5) if f"{c}/{c}_v{k}" not in held]
    assert trained  # split 1's test videos it was trained on (seed 0's carve)
    from pipeline.run import seen_among  # and evaluate can count them in a split holding only some
    from pipeline.run import video_fingerprints, with_earlier  # each part to its part: a carved --init's held-out
    both = with_earlier(video_fingerprints(["a"], ["b"]), video_fingerprints(["c"], ["b", "d"]), ["e"])  # videos
    assert seen_among(both, ["a", "b", "c", "d", "e", "f"]) == (3, 2)  # are trained on by neither run
    s2_val = {f"{c}/{c}_v{k}" for c in COLOURS for k in (4, 5)}  # what its --init picked its epoch on: val too
    assert seen_among(load_checkpoint(tmp_path / "e2e" / "best.pt")["seen_videos"], [*trained, *held, "x/y"]) == \
        (len(trained), len(held) + len(set(trained) & s2_val))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        finetune(FinetuneConfig(dataset=split1, out=str(tmp_path / "back"), init=str(tmp_path / "e2e" / "best.pt"),
                                **{**still, "val_split": None}), progress=False)
    assert (f"--init {tmp_path / 'e2e' / 'best.pt'} was trained on {len(trained)} of its 6 videos "
            f"({', '.join(trained[:5])}" in caplog.text)


def test_fps_on_frame_folders_without_their_rate_is_refused(colour_data, tmp_path, weights_file):
    """--fps samples by time, which frame folders only have from --folder-fps: without it finetune
    kept every frame without a word (extract-features and predict refuse it), also where --init's
    selection came from a cache of video files."""
    from pipeline.config import FrameSelection

    with pytest.raises(ConfigError, match=r"--fps needs the frame rate of frame folders such as .*: add --folder-fps"):
        finetune(ft_cfg(colour_data, tmp_path / "a", weights_file, selection=FrameSelection(fps=5)), progress=False)
    extract_features(ExtractConfig(dataset=DatasetSpec(str(colour_data)), output=str(tmp_path / "f.h5"),
                                   weights=str(weights_file), frame_spec=FrameSpec(size=SIZE), workers=0, batch_size=8),
                     progress=False)
    train_temporal(TemporalConfig(cache=str(tmp_path / "f.h5"), out=str(tmp_path / "s2"), hidden=16, epochs=1,
                                  seq_len=4, device="cpu"), progress=False)
    ck = torch.load(tmp_path / "s2" / "best.pt", weights_only=True)  # as if extracted from video files at 5 fps
    ck["cache"]["selection"] = {**ck["cache"]["selection"], "fps": 5.0, "folder_fps": None}
    torch.save(ck, tmp_path / "s2-fps.pt")
    with pytest.raises(ConfigError, match=r"--init .*s2-fps\.pt samples frames at --fps 5, and .* is a frame folder, "
                                          r"whose frame rate it does not record"):
        finetune(FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out=str(tmp_path / "b"),
                                init=str(tmp_path / "s2-fps.pt"), epochs=1, workers=0, device="cpu"), progress=False)
    assert not (tmp_path / "a" / "best.pt").exists() and not (tmp_path / "b" / "best.pt").exists()


def test_init_holds_out_its_runs_videos_where_the_dataset_has_videos_its_cache_skipped(colour_data, tmp_path,
                                                                                       weights_file):
    """Undecodable videos are in the dataset's index but not in the cache the --init run carved from:
    carving again from the index drew other videos, some of them trained on by the --init head."""
    root = tmp_path / "ds"
    shutil.copytree(colour_data / "train", root / "train")
    for cls in COLOURS:
        for name in ("a_broken", "m_broken", "z_broken"):
            (root / "train" / cls / f"{cls}_{name}").mkdir()  # no frames: skipped by extraction
    only_train = DatasetSpec(str(root), splits=("train",))
    extract_features(ExtractConfig(dataset=only_train, output=str(tmp_path / "f.h5"), weights=str(weights_file),
                                   frame_spec=FrameSpec(size=SIZE), workers=0, batch_size=8), progress=False)
    train_temporal(TemporalConfig(cache=str(tmp_path / "f.h5"), out=str(tmp_path / "s2"), hidden=16, epochs=1,
                                  seq_len=4, val_fraction=0.3, device="cpu"), progress=False)
    held_out = load_checkpoint(tmp_path / "s2" / "best.pt")["validation"]["videos"]
    finetune(FinetuneConfig(dataset=only_train, out=str(tmp_path / "e2e"), val_fraction=0.3, epochs=1, batch_size=6,
                            workers=0, device="cpu", freeze_cnn=True, init=str(tmp_path / "s2" / "best.pt")),
             progress=False)
    assert sorted(load_checkpoint(tmp_path / "e2e" / "best.pt")["validation"]["videos"]) == sorted(held_out)


def test_init_keeps_its_validation_carve_and_resume_keeps_the_carve(colour_data, tmp_path, weights_file, caplog):
    """Without a val split, finetune carves its validation set from train. Started from --init, it
    must hold out the same videos the --init run held out: other ones were trained on by its head,
    and the best epoch would be picked on them. The same carve with another --seed (which seeds the
    training) holds out the same videos; another --val-fraction is refused. An --init validated on
    a split gets a warning; one from another dataset leaves the carve free. --resume with another
    carve is refused too."""
    only_train = DatasetSpec(str(colour_data), splits=("train",))
    cache = tmp_path / "f.h5"
    extract_features(ExtractConfig(dataset=only_train, output=str(cache), weights=str(weights_file),
                                   frame_spec=FrameSpec(size=SIZE), workers=0, batch_size=8), progress=False)
    train_temporal(TemporalConfig(cache=str(cache), out=str(tmp_path / "s2"), hidden=16, epochs=1, seq_len=4,
                                  val_fraction=0.3, device="cpu"), progress=False)
    s2_val = load_checkpoint(tmp_path / "s2" / "best.pt")["validation"]
    assert s2_val["kind"] == "carved" and len(s2_val["videos"]) >= 3
    still = dict(epochs=1, batch_size=6, workers=0, device="cpu", freeze_cnn=True, init=str(tmp_path / "s2" / "best.pt"))
    finetune(FinetuneConfig(dataset=only_train, out=str(tmp_path / "e2e"), val_fraction=0.3, seed=5, **still),
             progress=False)
    assert load_checkpoint(tmp_path / "e2e" / "best.pt")["validation"] == s2_val  # the same videos, seed and all
    with pytest.raises(ConfigError, match=r"validated on videos carved from this training split with other settings "
                                          r"\(--val-fraction 0\.3, here 0\.5; --group-pattern None, here '\(\.\*\)_'\): "
                                          r"this run's carve would hold out videos its head was trained on"):
        finetune(FinetuneConfig(dataset=only_train, out=str(tmp_path / "x"), val_fraction=0.5, group_pattern="(.*)_",
                                **still), progress=False)
    # an --init validated on the val split was trained on all of train: no carve of train is clean
    extract_features(ExtractConfig(dataset=DatasetSpec(str(colour_data)), output=str(tmp_path / "full.h5"),
                                   weights=str(weights_file), frame_spec=FrameSpec(size=SIZE), workers=0, batch_size=8),
                     progress=False)
    train_temporal(TemporalConfig(cache=str(tmp_path / "full.h5"), out=str(tmp_path / "s2v"), hidden=16, epochs=1,
                                  seq_len=4, device="cpu"), progress=False)
    # an --init validated on a val split was trained on its whole train split: read from its cache, a
    # carve of that split here holds out videos its head has seen, and is refused
    s2v = {**still, "init": str(tmp_path / "s2v" / "best.pt")}
    with pytest.raises(ConfigError, match=r"--init .* was trained on the whole of split 'train' of .*full\.h5, and "
                                          r"\d+ of the \d+ videos carved here for validation are among them "):
        finetune(FinetuneConfig(dataset=only_train, out=str(tmp_path / "y"), **s2v), progress=False)
    # without that cache it cannot be told whether this is that split: a warning says what to do
    import logging

    (tmp_path / "full.h5").rename(tmp_path / "gone.h5")
    with caplog.at_level(logging.WARNING):
        finetune(FinetuneConfig(dataset=only_train, out=str(tmp_path / "y"), **s2v), progress=False)
    (tmp_path / "gone.h5").rename(tmp_path / "full.h5")
    assert "validated on split 'val' and trained on its whole training split: if that is this dataset's 'train'" \
        in caplog.text
    # an --init carved from another dataset (none of its held-out videos is here) leaves the carve free
    other = tmp_path / "other_ds"
    shutil.copytree(colour_data / "train", other / "train")
    for d in (other / "train").glob("*/*"):
        d.rename(d.with_name("x" + d.name))
    caplog.clear()
    finetune(FinetuneConfig(dataset=DatasetSpec(str(other)), out=str(tmp_path / "o"), val_fraction=0.5, seed=3,
                            **still), progress=False)
    assert load_checkpoint(tmp_path / "o" / "best.pt")["validation"]["seed"] == 3
    assert "not in the --init run's validation set" not in caplog.text  # its held-out videos are another dataset's
    # nor does one validated on a split, whose training videos (read from its cache) are another dataset's
    finetune(FinetuneConfig(dataset=DatasetSpec(str(other)), out=str(tmp_path / "o2"), val_fraction=0.5, **s2v),
             progress=False)
    assert "validated on split" not in caplog.text
    # a transformer head has learned positions for the clips it was trained on, no more
    train_temporal(TemporalConfig(cache=str(tmp_path / "full.h5"), out=str(tmp_path / "tr"), head="transformer",
                                  hidden=16, num_heads=2, epochs=1, seq_len=4, device="cpu"), progress=False)
    with pytest.raises(ConfigError, match=r"--seq-len 6 is longer than the transformer head of --init .* takes "
                                          r"\(4 learned positions\): use --seq-len 4 or less$"):
        finetune(FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out=str(tmp_path / "z"), seq_len=6,
                                **{**still, "init": str(tmp_path / "tr" / "best.pt")}), progress=False)
    assert not (tmp_path / "z" / "config.json").exists()
    # --resume with another carve: the epochs so far were picked on other videos
    from pipeline.checkpoint import CheckpointError

    def carved(**kw) -> FinetuneConfig:
        return dataclasses.replace(ft_cfg(colour_data, tmp_path / "run", weights_file, **kw), dataset=only_train)

    finetune(carved(epochs=1), progress=False)
    with pytest.raises(CheckpointError, match="was validated on other videos"):
        finetune(carved(epochs=2, val_fraction=0.3, resume=True), progress=False)


def test_learning_rates_and_weight_decay_are_checked(colour_data):
    """click's float ranges let nan and inf through, and the Python API has no click at all."""
    for kw, msg in (({"lr": float("nan")}, "lr must be > 0 and at most 1, got nan"),
                    ({"backbone_lr": float("inf")}, "backbone_lr must be > 0 and at most 1, got inf"),
                    ({"lr": 2.0}, "lr must be > 0 and at most 1, got 2.0"),
                    ({"weight_decay": float("inf")}, "weight_decay must be >= 0 and finite, got inf")):
        with pytest.raises(ConfigError, match=msg):
            FinetuneConfig(dataset=DatasetSpec(str(colour_data)), out="x", **kw)


def test_backbone_by_name_and_its_learning_rate(colour_data, tmp_path):
    """--backbone reaches the model and the checkpoint; the backbone learns at a tenth of --lr
    unless --backbone-lr says otherwise; random BatchNorm statistics are not frozen in."""
    r18 = calibrated_backbone_file("resnet18", tmp_path)
    finetune(ft_cfg(colour_data, tmp_path / "run", r18, backbone="resnet18", epochs=1, trainable_blocks=1,
                    backbone_lr=None), progress=False)
    ck = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ck["cache"]["backbone"] == "resnet18" and ck["cache"]["feature_dim"] == 512
    assert ck["backbone_state"].keys() == torch.load(r18, weights_only=True).keys()
    lrs = sorted(g["initial_lr"] for g in ck["optimizer_state"]["param_groups"])
    assert lrs == pytest.approx([3e-4, 3e-3])  # the last block at --lr / 10, the head at --lr
    with pytest.raises(ConfigError, match="BatchNorm statistics are untrained"):
        finetune(ft_cfg(colour_data, tmp_path / "x", "none", backbone="resnet18", trainable_blocks=1), progress=False)
    import torchvision

    torch.save(torchvision.models.vit_b_16(image_size=48).state_dict(), tmp_path / "vit48.pt")  # weights fix the size
    with pytest.raises(ConfigError, match=r"^vit_b_16 cannot take 32x32 frames \(.*\); use --size 48"):
        finetune(ft_cfg(colour_data, tmp_path / "vit", str(tmp_path / "vit48.pt"), backbone="vit_b_16"), progress=False)
    assert not list((tmp_path / "vit").glob("*.pt"))
    one = tmp_path / "one"  # a training split of one class: refused, as stage two refuses it
    for split in ("train", "val"):
        shutil.copytree(colour_data / split / "red", one / split / "red")
    with pytest.raises(DataError, match=r"^split 'train' of .*one has videos of 1 class\(es\) \(red\); a classifier"):
        finetune(ft_cfg(one, tmp_path / "one_run", r18, backbone="resnet18"), progress=False)


def test_resume_data_check_compares_what_the_run_recorded():
    from pipeline.checkpoint import CheckpointError
    from pipeline.run import check_resume_data, data_identity

    then = data_identity(["a", "b"], ["c"], sources=(["frames:1", "bytes:2"], ["bytes:3"]))
    check_resume_data("last.pt", then, data_identity(["a", "b"], ["c"], sources=(["frames:1", "bytes:2"], ["bytes:3"])))
    changed = data_identity(["a", "b"], ["c"], sources=(["frames:1", "bytes:2"], ["bytes:4"]))
    with pytest.raises(CheckpointError, match=r"^last\.pt was validated on 1 videos of these names, but one or more"):
        check_resume_data("last.pt", then, changed)
    # a run saved before signatures were recorded: its names are checked, and it resumes
    names_only = {part: {k: v for k, v in d.items() if k != "sources"} for part, d in then.items()}
    check_resume_data("last.pt", names_only, changed)
    with pytest.raises(CheckpointError, match=r"was trained on other videos than the data has now \(2 then, 1 now"):
        check_resume_data("last.pt", names_only, data_identity(["a"], ["c"], sources=(["frames:1"], ["bytes:3"])))


def test_interrupt_then_resume(colour_data, tmp_path, weights_file, caplog):
    class Stop(Exception):
        pass

    def stop(rec):
        if rec["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=2), progress=False, on_epoch=stop)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    from pipeline.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="--trainable-blocks"):
        finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=2, resume=True, trainable_blocks=3),
                 progress=False)
    recorded = load_checkpoint(tmp_path / "run" / "last.pt")["train_config"]
    clips = recorded["eval_clips"]
    with pytest.raises(CheckpointError, match=rf"--eval-clips {clips}, this run asks for {clips + 1};"):
        finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=2, resume=True, eval_clips=clips + 1),
                 progress=False)
    # the optimiser's and the loss's options too: the restored optimiser would keep the old weight
    # decay while config.json recorded the new one, the others would change mid-run
    for key, value in (("weight_decay", 0.5), ("warmup_epochs", 2.0), ("label_smoothing", 0.5), ("clip_grad", 0.01)):
        assert recorded[key] != value
        option = f"--{key.replace('_', '-')}"
        with pytest.raises(CheckpointError, match=rf"{option} {recorded[key]}, this run asks for {value};"):
            finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=2, resume=True, **{key: value}),
                     progress=False)
    # last.pt as two torchrun processes would have written it: --batch-size is per process
    last = tmp_path / "run" / "last.pt"
    ck = torch.load(last, weights_only=False)
    assert ck["train_config"]["world_size"] == 1
    torch.save({**ck, "train_config": {**ck["train_config"], "world_size": 2}}, tmp_path / "two.pt")
    last.rename(tmp_path / "one.pt")
    (tmp_path / "two.pt").rename(last)
    with pytest.raises(CheckpointError, match=r"last\.pt was trained by 2 process\(es\), this run has 1: --batch-size is "
                                              r"per process"):
        finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=2, resume=True), progress=False)
    (tmp_path / "one.pt").replace(last)
    # a val video gone since (the dataset changed): the best epoch would be picked across two val sets
    gone = colour_data / "val" / "red" / "red_val_0"
    gone.rename(tmp_path / "away")
    try:
        with pytest.raises(CheckpointError, match=r"last\.pt was validated on other videos than the data has now "
                                                  r"\(9 then, 8 now: the dataset or its cache changed since\)"):
            finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=2, resume=True), progress=False)
    finally:
        (tmp_path / "away").rename(gone)
    # a train video's frame replaced under the same name (the dataset re-exported): other frames
    frame = sorted((colour_data / "train" / "blue" / "blue_train_1").iterdir())[2]
    kept = frame.read_bytes()
    Image.new("RGB", (32, 24), (255, 255, 0)).save(frame)
    try:
        with pytest.raises(CheckpointError, match=r"last\.pt was trained on 24 videos of these names, but one or more "
                                                  r"of them changed on disk since \(a frame folder's frame names or"):
            finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=2, resume=True), progress=False)
    finally:
        frame.write_bytes(kept)
    # as if epoch 1 had run on a GPU: resumed with a warning (the arithmetic here is the same anyway)
    ck = torch.load(last, weights_only=False)
    assert ck["compute"] == "cpu float32"
    torch.save({**ck, "compute": "cuda bfloat16"}, last)
    r = finetune(ft_cfg(colour_data, tmp_path / "run", weights_file, epochs=2, resume=True), progress=False)
    assert [h["epoch"] for h in r.history] == [1, 2]
    assert f"{last} trained its 1 epoch(s) in cuda bfloat16, this run continues in cpu float32" in caplog.text
    # the same as a run that was never interrupted: optimizer, scheduler and sampling state all resumed
    whole = finetune(ft_cfg(colour_data, tmp_path / "whole", weights_file, epochs=2), progress=False)
    assert [h["train_loss"] for h in r.history] == [h["train_loss"] for h in whole.history]
    a, b = load_checkpoint(tmp_path / "run" / "last.pt"), load_checkpoint(tmp_path / "whole" / "last.pt")
    for key in ("backbone_state", "model_state"):
        assert_states_close(a[key], b[key], atol=0)


def test_grad_checkpoint_same_step_and_batchnorm_statistics(weights_file):
    from pipeline.backbones import create_backbone
    from pipeline.finetune import EndToEnd
    from pipeline.heads import HeadConfig, build_head

    torch.manual_seed(0)
    clips = torch.randint(0, 256, (2, 3, 3, SIZE, SIZE), dtype=torch.uint8)
    lengths, y = torch.tensor([3, 2]), torch.tensor([0, 1])
    results = []
    for gc in (False, True):
        torch.manual_seed(1)
        m = EndToEnd(create_backbone("mobilenet_v2", str(weights_file)),
                     build_head(HeadConfig(2, input_dim=1280, hidden=4, dropout=0)),
                     FrameSpec(size=SIZE), trainable_blocks=3, grad_checkpoint=gc).train()
        torch.nn.functional.cross_entropy(m(clips, lengths), y).backward()
        results.append((m.backbone.state_dict(), [p.grad.clone() for p in m.backbone.features[18].parameters()]))
    (sa, ga), (sb, gb) = results
    for k in sa:  # running statistics updated once, as without checkpointing (the batch counter
        if not k.endswith("num_batches_tracked"):  # counts the recompute; unused while momentum is set)
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc; Linux)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = [c for c, p in parent.items() if p == here]
        out += kids
        todo += kids
    return out


def _torchrun(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """torchrun with two processes. Output goes to files, which a hung rank cannot hold open the way
    it holds a pipe. On a hang, torchrun is asked to stop its ranks (SIGTERM), then it and every
    process under it are killed (each rank has a session of its own, so no process group covers
    them): nothing is left running after the test fails."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                              str(REPO / "cli.py"), *args], stdout=out, stderr=err, text=True, cwd=cwd)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            left = _descendants(p.pid)
            p.terminate()
            try:
                p.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
            for pid in [p.pid, *left]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait()
            err.seek(0)
            pytest.fail(f"torchrun {args[0]} hung for {timeout:.0f} s; stderr: {err.read()[-3000:]}")
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(p.args, p.returncode, out.read(), err.read())


@pytest.mark.slow
def test_torchrun_two_process_finetune(colour_data, tmp_path, weights_file):
    """With a broken training video and one clip per batch: a rank whose clip fails must still take
    its step (the clip is replaced), or DDP would hang."""
    data = tmp_path / "ds"
    shutil.copytree(colour_data, data)
    for f in (data / "train" / "blue" / "blue_train_0").iterdir():
        f.write_bytes(b"junk")
    r = _torchrun("finetune-end-to-end", "--data-dir", str(data), "--out", str(tmp_path / "ddp"),
                  "--weights", str(weights_file), "--size", str(SIZE), "--hidden", "16", "--seq-len", "4",
                  "--epochs", "2", "--batch-size", "1", "--workers", "0", "--device", "cpu", "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("best epoch") == 1  # only rank 0 reports
    ck = load_checkpoint(tmp_path / "ddp" / "best.pt", kind="end_to_end")
    assert len(ck["history"] if "history" in ck else load_checkpoint(tmp_path / "ddp" / "last.pt")["history"]) >= 1
    Predictor(tmp_path / "ddp" / "best.pt", device="cpu")


@pytest.mark.slow
def test_torchrun_two_process_extract_equals_single(colour_data, tmp_path, weights_file):
    # torchrun gives each process one thread (OMP_NUM_THREADS=1); the thread count changes the
    # order of float reductions, so the single-process reference runs with one thread too.
    single = tmp_path / "single.h5"
    args = ["--weights", str(weights_file), "--size", str(SIZE), "--batch-size", "8", "--workers", "1", "--no-progress"]
    ref = subprocess.run([sys.executable, str(REPO / "cli.py"), "extract-features", "--data-dir", str(colour_data),
                          "--output", str(single), *args], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ref.returncode == 0, ref.stderr
    r = _torchrun("extract-features", "--data-dir", str(colour_data), "--output", str(tmp_path / "sharded.h5"),
                  "--weights", str(weights_file), "--size", str(SIZE), "--batch-size", "8", "--workers", "1",
                  "--no-progress", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1
    assert_same_cache(single, tmp_path / "sharded.h5")


@pytest.mark.slow
def test_torchrun_failing_rank_stops_all(colour_data, tmp_path, weights_file):
    """One rank meets a broken frame under --strict: every rank exits, the error is shown once."""
    broken = tmp_path / "ds"
    shutil.copytree(colour_data, broken)
    (broken / "train" / "red" / "red_train_0" / "frame_1.png").write_bytes(b"junk")
    r = _torchrun("extract-features", "--data-dir", str(broken), "--output", str(tmp_path / "x.h5"), "--weights",
                  str(weights_file), "--size", str(SIZE), "--batch-size", "8", "--workers", "0", "--strict",
                  "--no-progress", cwd=tmp_path)
    assert r.returncode != 0
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert any("red_train_0/frame_1.png" in e and "--strict" in e for e in errors), r.stderr[-2000:]
    assert not (tmp_path / "x.h5").exists()
