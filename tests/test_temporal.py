"""Stage two: the LSTM learns, uses frame order, ignores padding, resumes exactly, round-trips."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from synthetic import reversal_cache, separable_cache

from cli import main
from pipeline.cache import FeatureCache
from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.config import TemporalConfig
from pipeline.errors import ConfigError
from pipeline.heads import HeadConfig, build_head
from pipeline.sampling import random_clips, segment_clips, uniform_clips
from pipeline.train import TrainingError, evaluate_checkpoint, train_temporal


def cfg(cache, out, **kw) -> TemporalConfig:
    base = dict(hidden=32, epochs=8, batch_size=16, lr=3e-3, dropout=0.1, seq_len=8, warmup_epochs=0.5, device="cpu")
    return TemporalConfig(cache=str(cache), out=str(out), **{**base, **kw})


def test_separable_cache_learned(tmp_path):
    """(How fast is bench/temporal.py's to say: a wall-clock bound here failed whenever the machine was busy.)"""
    cache = separable_cache(tmp_path / "c.h5", classes=4)
    r = train_temporal(cfg(cache, tmp_path / "run"), progress=False)
    assert r.best["top1"] >= 0.9  # chance 0.25
    for f in ("best.pt", "last.pt", "config.json", "metrics.jsonl", "curves.png", "confusion.png", "per_class.csv"):
        assert (tmp_path / "run" / f).is_file(), f
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["epoch"] for ln in lines] == list(range(1, 9))


def _mean_pool_baseline(cache_path, steps: int = 300) -> float:
    """Logistic regression on the mean frame feature: order-invariant by construction."""
    with FeatureCache(cache_path) as c:
        tr, te = c.load_split("train"), c.load_split("test")

    def pooled(d):
        return torch.tensor(np.stack([d.video(i).astype(np.float32).mean(0) for i in range(len(d))]))

    xtr, xte = pooled(tr), pooled(te)
    ytr, yte = torch.tensor(tr.labels), torch.tensor(te.labels)
    lin = torch.nn.Linear(xtr.shape[1], 2)
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(lin(xtr), ytr).backward()
        opt.step()
    return float((lin(xte).argmax(1) == yte).float().mean())


def test_lstm_separates_time_reversed_classes_mean_pool_cannot(tmp_path):
    cache = reversal_cache(tmp_path / "rev.h5")
    r = train_temporal(cfg(cache, tmp_path / "run", epochs=12, seq_len=8), progress=False)
    assert r.best["top1"] >= 0.9
    assert _mean_pool_baseline(cache) <= 0.65  # chance 0.5: frames alone carry no label


def test_last_pool_uses_backward_final_state():
    """For a bidirectional LSTM, 'last' must see the whole clip in both directions."""
    torch.manual_seed(0)
    m = build_head(HeadConfig(num_classes=2, input_dim=4, hidden=5, bidirectional=True, dropout=0)).eval()
    x = torch.randn(1, 6, 4)
    y = x.clone()
    y[0, 0] += 5  # change only the first frame
    with torch.no_grad():
        _, (h_n, _) = m.rnn(x)
        z = torch.cat([h_n[0], h_n[1]], 1)
        torch.testing.assert_close(m(x), m.classifier(z))
        assert not torch.allclose(m(x), m(y))


def test_samplers():
    rng = np.random.default_rng(0)
    lengths = np.array([100, 16, 5])
    pos, n = segment_clips(lengths, 8, rng)
    assert list(n) == [8, 8, 5] and pos.shape == (3, 8)
    # segment i of a 100-frame video is frames [floor(12.5 i), floor(12.5 (i + 1)))
    assert all(int(12.5 * i) <= p < int(12.5 * (i + 1)) for i, p in enumerate(pos[0]))
    assert all(2 * i <= p < 2 * i + 2 for i, p in enumerate(pos[1]))
    many = np.stack([segment_clips(lengths[:1], 8, rng)[0][0] for _ in range(200)])
    assert len(np.unique(many[:, 0])) == 12  # every frame of a segment can be drawn
    assert list(pos[2][:5]) == [0, 1, 2, 3, 4]
    pos, _ = random_clips(lengths, 8, rng)
    assert (np.diff(pos[0]) == 1).all() and 0 <= pos[0, 0] <= 92
    u1, _ = uniform_clips(lengths, 4)
    assert list(u1[0]) == [12, 37, 62, 87]
    assert np.array_equal(u1, uniform_clips(lengths, 4)[0])  # deterministic
    u2a, _ = uniform_clips(lengths, 4, clip=0, num_clips=2)
    u2b, _ = uniform_clips(lengths, 4, clip=1, num_clips=2)
    assert list(u2a[0]) == [6, 31, 56, 81] and list(u2b[0]) == [18, 43, 68, 93]
    # exactly the frame at (i + (k + 1/2)/K) * T/L, also where that lands on a frame boundary (floats
    # gave 10 for T 24, L 20, K 3, k 0, i 9: (9 + 1/6) * 1.2 = 11 exactly)
    from fractions import Fraction

    for t, seq, k_of in ((24, 20, 3), (35, 7, 5), (199, 32, 10), (60, 16, 6)):
        for k in range(k_of):
            got = uniform_clips(np.array([t]), seq, clip=k, num_clips=k_of)[0][0]
            assert list(got) == [int((i + Fraction(2 * k + 1, 2 * k_of)) * Fraction(t, seq)) for i in range(seq)]
    assert uniform_clips(np.array([24]), 20, clip=0, num_clips=3)[0][0][9] == 11
    # TSN segments are [floor(i T / L), floor((i + 1) T / L)) exactly (floats put segment 7 of T 122,
    # L 14 at 60..68 instead of 61..68): the lowest and highest frame each segment can draw
    for t, seq in ((122, 14), (230, 14), (294, 18), (100, 8)):
        drawn = np.stack([segment_clips(np.array([t]), seq, rng)[0][0] for _ in range(400)])
        assert list(drawn.min(0)) == [i * t // seq for i in range(seq)], (t, seq)
        assert list(drawn.max(0)) == [(i + 1) * t // seq - 1 for i in range(seq)], (t, seq)


def test_resume_equals_uninterrupted(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 10, "test": 4})
    full = train_temporal(cfg(cache, tmp_path / "full", epochs=4), progress=False)
    with pytest.raises(Stop):
        train_temporal(cfg(cache, tmp_path / "part", epochs=4), progress=False, on_epoch=_stop_after(2))
    resumed = train_temporal(cfg(cache, tmp_path / "part", epochs=4, resume=True), progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4]
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "part" / "last.pt")["model_state"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    for x, y in zip(full.history, resumed.history):
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-6)
    # another head is refused by the options that differ, not by two whole configs to compare by eye
    with pytest.raises(CheckpointError) as e:
        train_temporal(cfg(cache, tmp_path / "part", epochs=5, resume=True, seq_len=4, hidden=16), progress=False)
    assert str(e.value) == (f"{tmp_path / 'part' / 'last.pt'} was trained with --hidden 32 (this run: --hidden 16), "
                            "--seq-len 8 (this run: --seq-len 4); resume with the same options, or --overwrite to "
                            "start over")
    # an option the head does not read (and the command says so) is no reason to refuse
    r = train_temporal(cfg(cache, tmp_path / "part", epochs=5, resume=True, num_heads=7), progress=False)
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4, 5]


def test_plots_are_redrawn_every_few_seconds_and_finished_on_the_picked_epoch(tmp_path, monkeypatch, plots_drawn):
    """A plot costs more to draw than a small head's epoch: while a run trains, each is redrawn at
    most every PLOT_EVERY_S (every epoch when that is 0, as for slow epochs). At the end curves.png
    shows every epoch and confusion.png the picked one, also after a resume that improves on
    nothing, where the killed run had not drawn its best epoch yet."""
    import pipeline.run as run_mod
    drawn = plots_drawn
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 10, "test": 4})
    monkeypatch.setattr(run_mod, "PLOT_EVERY_S", 0.0)
    r = train_temporal(cfg(cache, tmp_path / "every", epochs=4), progress=False)
    assert [n for k, n in drawn if k == "curves"] == [1, 2, 3, 4]
    assert [e for k, e in drawn if k == "confusion"][-1] == r.best["epoch"]

    monkeypatch.setattr(run_mod, "PLOT_EVERY_S", 3600.0)
    drawn.clear()
    r = train_temporal(cfg(cache, tmp_path / "run", epochs=6), progress=False)
    best = load_checkpoint(tmp_path / "run" / "best.pt")["epoch"]
    assert best == r.best["epoch"] > 1  # the separable cache improves after the first epoch
    assert drawn == [("confusion", 1), ("curves", 1), ("curves", 6), ("confusion", best)]

    drawn.clear()
    with pytest.raises(Stop):  # killed after epoch 3, its best epoch not drawn yet
        train_temporal(cfg(cache, tmp_path / "part", epochs=3), progress=False, on_epoch=_stop_after(3))
    best = load_checkpoint(tmp_path / "part" / "best.pt")["epoch"]
    assert best > 1 and drawn == [("confusion", 1), ("curves", 1)]
    drawn.clear()
    train_temporal(cfg(cache, tmp_path / "part", epochs=3, resume=True), progress=False)  # nothing left to train
    assert drawn == [("curves", 3), ("confusion", best)]


class Stop(Exception):
    """Stands in for Ctrl-C after an epoch (a real KeyboardInterrupt would stop pytest itself)."""


def _stop_after(n: int):
    def cb(rec):
        if rec["epoch"] == n:
            raise Stop
    return cb


def test_interrupt_leaves_loadable_last(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    with pytest.raises(Stop):
        train_temporal(cfg(cache, tmp_path / "run", epochs=5), progress=False, on_epoch=_stop_after(2))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 2


def test_checkpoint_round_trip_and_evaluate_reproduces_best(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=4, per_class={"train": 12, "test": 6})
    r = train_temporal(cfg(cache, tmp_path / "run", epochs=5, eval_clips=2), progress=False)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["schema_version"] == 2 and ckpt["kind"] == "temporal" and ckpt["epoch"] == r.best_epoch
    assert ckpt["classes"] == ["c0", "c1", "c2", "c3"] and ckpt["frame_spec"]["size"] == 32
    assert ckpt["cache"]["weights"]["sha256"] == "0" * 64
    head = build_head(HeadConfig.from_dict(ckpt["model_config"]))
    head.load_state_dict(ckpt["model_state"])  # strict: every key present
    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", cache, "test", device="cpu")
    for k in ("top1", "top5", "mean_class_acc"):  # the end-of-training test pass, reproduced
        assert ev.metrics[k] == pytest.approx(r.test[k])
    assert ev.metrics["loss"] == pytest.approx(r.test["loss"], rel=1e-5)
    assert ev.seen == ""  # held out: no warning


def test_evaluate_says_when_the_split_is_not_held_out(tmp_path, caplog):
    """Numbers on the videos a model was picked or trained on overstate its accuracy: evaluate says
    so, from what the run recorded (its validation split, its carve, its training videos)."""
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 8, "val": 3, "test": 3})
    train_temporal(cfg(cache, tmp_path / "picked", epochs=1), progress=False)  # on the val split
    # the same videos without a val split: the run carves its validation set from train
    carving = separable_cache(tmp_path / "t.h5", classes=3, per_class={"train": 8, "val": 3, "test": 3})
    with h5py.File(carving, "a") as f:
        del f["val"]
    train_temporal(cfg(carving, tmp_path / "carved", epochs=1, val_fraction=0.25), progress=False)
    seen = {(run, split): evaluate_checkpoint(tmp_path / run / "best.pt", c, split, device="cpu").seen
            for run, c, splits in (("picked", cache, ("train", "val", "test")), ("carved", carving, ("train", "test")))
            for split in splits}
    assert seen["picked", "val"].startswith("the best epoch of this model was picked on these 9 videos")
    assert seen["picked", "train"] == "this model was trained on these 24 videos"
    assert seen["carved", "train"].startswith("this split holds the 6 videos this model's best epoch was picked on")
    assert seen["picked", "test"] == seen["carved", "test"] == ""
    # a split holding only some of them (another split list of the same videos, as HMDB51's three are)
    from pipeline.cache import VideoRecord, write_cache
    from synthetic import provenance

    def mixed(src, path, picks):
        recs = []
        with FeatureCache(src) as c:
            for split, names in picks.items():
                d = c.load_split(split)
                for i, v in enumerate(d.videos):
                    if v in names:
                        a, b = d.offsets[i], d.offsets[i + 1]
                        recs.append(VideoRecord(v, int(d.labels[i]), d.features[a:b], d.frame_indices[a:b], 30.0))
        return write_cache(path, provenance(["c0", "c1", "c2"], 32, "float16"), {"mix": iter(recs)})

    mix = mixed(cache, tmp_path / "m.h5", {"train": {"train/c0/v0", "train/c1/v3", "train/c2/v7"},
                                            "val": {"val/c1/v1"}, "test": {"test/c0/v0", "test/c2/v2"}})
    assert evaluate_checkpoint(tmp_path / "picked" / "best.pt", mix, "mix", device="cpu").seen == \
        "3 this model was trained on and 1 its best epoch was picked on, of these 6 videos"
    carved_val = load_checkpoint(tmp_path / "carved" / "best.pt")["validation"]["videos"]
    mix = mixed(carving, tmp_path / "n.h5", {"train": set(carved_val[:2]), "test": {"test/c0/v0"}})
    assert evaluate_checkpoint(tmp_path / "carved" / "best.pt", mix, "mix", device="cpu").seen == \
        "2 its best epoch was picked on, of these 3 videos"
    mix = mixed(cache, tmp_path / "o.h5", {"test": {"test/c0/v0", "test/c1/v1"}})
    assert evaluate_checkpoint(tmp_path / "picked" / "best.pt", mix, "mix", device="cpu").seen == ""
    old = load_checkpoint(tmp_path / "picked" / "best.pt")  # as written before runs recorded their videos
    del old["data"], old["seen_videos"]
    torch.save(old, tmp_path / "old.pt")
    assert evaluate_checkpoint(tmp_path / "old.pt", cache, "val", device="cpu").seen.startswith(
        "the best epoch of this model was picked on a split 'val'")
    assert evaluate_checkpoint(tmp_path / "old.pt", cache, "test", device="cpu").seen == ""
    assert "val: the best epoch of this model was picked on these 9 videos" in caplog.text
    assert "these numbers overstate accuracy on new videos (evaluate a held-out split)" in caplog.text


def test_evaluate_refuses_other_cache(tmp_path):
    a = separable_cache(tmp_path / "a.h5", classes=3, per_class={"train": 6, "test": 3})
    b = separable_cache(tmp_path / "b.h5", classes=4, per_class={"train": 6, "test": 3})
    train_temporal(cfg(a, tmp_path / "run", epochs=1), progress=False)
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "run" / "best.pt"), "--cache", str(b), "--split", "test"])
    assert r.exit_code == 1 and "class list" in r.stderr and "Traceback" not in r.stderr
    # the same features stored as float32: a head trained on float16 ones is not evaluated on them
    c = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3}, dtype="float32")
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "run" / "best.pt"), "--cache", str(c), "--split", "test"])
    assert r.exit_code == 1 and "feature dtype" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # --out the run folder: its per-class CSV and confusion matrix go with its test.json; other numbers
    # (here: more eval clips) are not written over them. The run's own numbers again are (the demo does that).
    run = tmp_path / "run"
    kept = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert "per_class_test.csv" in kept
    r = CliRunner().invoke(main, ["evaluate", str(run / "best.pt"), "--cache", str(a), "--out", str(run),
                                  "--eval-clips", "3"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if not ln.startswith("INFO:")]
    import re

    said = re.match(rf"error: --out {re.escape(str(run))} holds a run whose test results \(test.json: "
                    r"(top1|top5|mean_class_acc|loss) (\S+)\) are not this evaluation's \(\1 (\S+)\)", line)
    assert said, line  # it names a number that differs (with 3 clips here: the loss, not top-1)
    assert float(said[2]) == json.loads((run / "test.json").read_text())[said[1]] and float(said[2]) != float(said[3])
    assert line.endswith("its confusion_test.png and per_class_test.csv would no longer match them; "
                                     "write this evaluation to another --out")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == kept
    r = CliRunner().invoke(main, ["evaluate", str(run / "best.pt"), "--cache", str(a), "--out", str(run)])
    assert r.exit_code == 0, r.stderr
    assert (run / "per_class_test.csv").read_bytes() == kept["per_class_test.csv"]
    r = CliRunner().invoke(main, ["evaluate", str(run / "best.pt"), "--cache", str(a), "--out", str(run), "--split",
                                  "train"])  # files of its own name: written beside the run's
    assert r.exit_code == 0 and (run / "per_class_train.csv").is_file()
    r = CliRunner().invoke(main, ["evaluate", str(run / "best.pt"), "--cache", str(a), "--out", str(run), "--split",
                                  "train"])  # and again: those are evaluate's own files, not the run's
    assert r.exit_code == 0, r.stderr


def test_out_of_memory_is_one_line(tmp_path):
    """A head too large for the machine (the allocation fails at once, nothing is used): one line
    that says what to lower, no traceback."""
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "run"),
                                  "--hidden", "400000000", "--epochs", "1", "--device", "cpu", "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if not ln.startswith("INFO:")]
    assert line.startswith("error: out of memory (") and "can't allocate memory" in line
    assert line.endswith("; lower --batch-size, --seq-len or --hidden, use --load lazy, or free memory")  # train-temporal's
    assert not (tmp_path / "run").exists()  # the folder it made for the run is not left behind, empty


def test_bad_inputs(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    run = CliRunner().invoke
    base = ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs", "1",
            "--hidden", "8", "--no-progress"]
    r = run(main, base + ["--val-split", "val"])
    assert r.exit_code == 1 and "split 'val' is not in" in r.stderr
    r = run(main, base + ["--seq-len", "0"])
    assert r.exit_code == 2 and "--seq-len" in r.stderr
    r = run(main, base + ["--group-pattern", "(v)", "--val-fraction", "0.9"])  # one source: no fraction helps
    assert r.exit_code == 1 and "each class's videos come from one source video" in r.stderr
    assert "--val-fraction" not in r.stderr and "Traceback" not in r.stderr
    r = run(main, ["train-temporal", "--cache", str(tmp_path / "nope.h5"), "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "feature cache not found" in r.stderr
    (tmp_path / "file").write_text("x")
    r = run(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "file" / "run")])
    assert r.exit_code == 1 and f"{tmp_path / 'file'} is a file, not a folder" in r.stderr
    empty = separable_cache(tmp_path / "e.h5", classes=2, per_class={"train": 0, "test": 2})
    r = run(main, ["train-temporal", "--cache", str(empty), "--out", str(tmp_path / "r2")])
    assert r.exit_code == 1 and "has no videos" in r.stderr
    torch.save({"model": 1}, tmp_path / "model.pt")  # a checkpoint given as the cache
    r = run(main, ["train-temporal", "--cache", str(tmp_path / "model.pt"), "--out", str(tmp_path / "r3")])
    assert r.exit_code == 1 and r.stderr.strip() == (f"error: {tmp_path / 'model.pt'} is not an HDF5 feature "
                                                     "cache; give the .h5 file extract-features wrote")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    r = run(main, ["evaluate", str(tmp_path / "junk.pt"), "--cache", str(cache)])
    assert r.exit_code == 1 and "junk.pt is not a checkpoint this tool can load safely" in r.stderr
    torch.save({"model": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by"):
        load_checkpoint(tmp_path / "other.pt")


def test_nan_in_cache_and_diverging_loss_keep_best(tmp_path, monkeypatch):
    import h5py
    import torch.nn.functional as F

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    out = tmp_path / "run"
    train_temporal(cfg(cache, out, epochs=1), progress=False)
    best_before = (out / "best.pt").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run; use --resume"):
        train_temporal(cfg(cache, out, epochs=1), progress=False)
    # another command's run, or a sweep, there: --resume could not continue it, so it is not offered
    from pipeline.run import RunDir
    from pipeline.sweep import SweepConfig, sweep

    with pytest.raises(ConfigError, match=rf"^{out} holds a train-temporal run; use --overwrite to replace it, or "
                                          "another --out$"):
        RunDir(out, kind="end_to_end")
    sweep(SweepConfig(base=cfg(cache, tmp_path / "sw", epochs=1), grids=((("hidden", (8,)),),), min_epochs=1),
          progress=False)
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'sw'} holds a sweep; use --overwrite to replace it"):
        RunDir(tmp_path / "sw", kind="temporal")
    # a sweep interrupted before its first best.pt: a run there would be replaced when it is rerun
    (tmp_path / "sw" / "best.pt").unlink()
    for resume in (False, True):
        with pytest.raises(ConfigError, match=rf"^{tmp_path / 'sw'} holds a sweep; use --overwrite to replace it"):
            train_temporal(cfg(cache, tmp_path / "sw", epochs=1, resume=resume), progress=False)
    assert not (tmp_path / "sw" / "best.pt").exists()
    # Fault injection: the loss turns NaN when the run is resumed for more epochs.
    real_ce = F.cross_entropy
    monkeypatch.setattr(F, "cross_entropy", lambda *a, **k: real_ce(*a, **k) * float("nan"))
    with pytest.raises(TrainingError, match=r"epoch 2: loss became nan .*learning rate too high .*best.pt is kept"):
        train_temporal(cfg(cache, out, epochs=3, resume=True), progress=False)
    with pytest.raises(TrainingError, match=r"epoch 1: loss became nan .*; no epoch finished, so there is no best.pt$"):
        train_temporal(cfg(cache, tmp_path / "new", epochs=1), progress=False)  # not "kept": there is none
    monkeypatch.undo()
    from pipeline.cache import video_checksum

    with h5py.File(cache, "r+") as f:  # a NaN the extraction wrote (checksummed with it), not a damaged byte
        f["train/features"][5, 3] = np.nan
        end = int(f["train/offsets"][1])
        f["train/checksums"][0] = video_checksum(f["train/features"][:end], f["train/frame_indices"][:end])
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(out), "--overwrite"])
    assert r.exit_code == 1 and "NaN/Inf in the features of train/c0/v" in r.stderr
    assert (out / "best.pt").read_bytes() == best_before


# ------------------------------------------------------------------------- every head


HEAD_ARCHS = ["lstm", "gru", "transformer", "attention", "mean"]


def test_the_clis_head_names_are_the_registry():
    from pipeline.config import HEAD_ARCHS
    from pipeline.heads import HEADS

    assert tuple(HEADS) == HEAD_ARCHS  # the CLI lists them without importing torch


@pytest.mark.parametrize("arch, pool, bidirectional", [
    ("lstm", "last", False), ("lstm", "last", True), ("lstm", "mean", True), ("gru", "last", True),
    ("gru", "mean", False), ("transformer", "last", False), ("attention", "last", False), ("mean", "last", False)])
def test_every_head_ignores_padding(arch, pool, bidirectional):
    torch.manual_seed(0)
    m = build_head(HeadConfig(num_classes=3, input_dim=8, arch=arch, hidden=8, layers=2, max_len=10, pool=pool,
                              bidirectional=bidirectional)).eval()
    x = torch.randn(3, 10, 8)
    lengths = torch.tensor([10, 4, 7])
    padded = x.clone()
    for i, n in enumerate(lengths):
        padded[i, n:] = 1e3 * torch.randn(10 - n, 8)  # garbage in the padding
    with torch.no_grad():
        out = m(padded, lengths)
        assert out.shape == (3, 3)
        for i, n in enumerate(lengths):
            torch.testing.assert_close(out[i:i + 1], m(x[i:i + 1, :n], torch.tensor([n])), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(m(x, None), m(x, torch.tensor([10, 10, 10])), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", HEAD_ARCHS)
def test_every_head_resumes_exactly_and_loads_safely(tmp_path, arch):
    from pipeline.model import load_model

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 10, "test": 4})
    kw = dict(head=arch, epochs=4, hidden=16, num_heads=2)
    full = train_temporal(cfg(cache, tmp_path / "full", **kw), progress=False)
    with pytest.raises(Stop):
        train_temporal(cfg(cache, tmp_path / "part", **kw), progress=False, on_epoch=_stop_after(2))
    resumed = train_temporal(cfg(cache, tmp_path / "part", resume=True, **kw), progress=False)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model_state"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7)
    assert [h["val_loss"] for h in full.history] == pytest.approx([h["val_loss"] for h in resumed.history], rel=1e-6)
    assert full.test == pytest.approx(resumed.test)
    m = load_model(tmp_path / "full" / "best.pt")
    assert m.head_config.arch == arch and type(m.head).__name__ == type(build_head(m.head_config)).__name__


@pytest.mark.parametrize("arch", ["lstm", "gru", "transformer", "attention", "mean"])
def test_order_aware_heads_separate_time_reversals_mean_head_cannot(tmp_path, arch):
    cache = reversal_cache(tmp_path / "rev.h5")
    r = train_temporal(cfg(cache, tmp_path / "run", head=arch, epochs=20, num_heads=2, val_fraction=0.2),
                       progress=False)
    if arch == "mean":
        assert r.test["top1"] <= 0.65  # chance 0.5: the frames alone carry no label
    else:
        assert r.test["top1"] >= 0.9, r.test


def test_test_split_is_touched_once_with_the_picked_model(tmp_path, monkeypatch):
    import pipeline.engine
    import pipeline.train

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 12, "test": 5})
    seen: list[int] = []
    real = pipeline.engine.evaluate

    def counting(model, bank, **kw):
        seen.append(len(bank))
        return real(model, bank, **kw)

    monkeypatch.setattr(pipeline.train, "evaluate", counting)
    monkeypatch.setattr(pipeline.engine, "evaluate", counting)
    r = train_temporal(cfg(cache, tmp_path / "run", epochs=5), progress=False)
    assert seen.count(15) == 1 and len(seen) == 6  # five validations on the carve, one test pass
    assert r.test_split == "test" and "carved from 'train'" in r.val_split
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    carved = best["validation"]["videos"]
    assert best["validation"]["kind"] == "carved" and 0 < len(carved) < 36
    assert json.loads((tmp_path / "run" / "test.json").read_text())["epoch"] == r.best_epoch
    ev = evaluate_checkpoint(tmp_path / "run" / "best.pt", cache, "test", device="cpu")
    assert ev.metrics["top1"] == pytest.approx(r.test["top1"])


def test_picking_on_test_needs_the_option_and_warns(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=2, per_class={"train": 6, "test": 3})
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs",
                                  "1", "--hidden", "8", "--val-split", "test", "--no-progress"])
    assert r.exit_code == 0, r.stderr
    assert "overstates accuracy" in r.stderr and "picked on split 'test'" in r.stdout
    listed = next(ln for ln in r.stdout.splitlines() if ln.startswith("outputs in")).split(": ", 1)[1].split()
    assert "best.pt" in listed and "test.json" not in listed  # no test split: only what is there is listed
    assert all((tmp_path / "run" / n).is_file() for n in listed)
    base = ["train-temporal", "--cache", str(cache), "--epochs", "1", "--hidden", "8", "--no-progress"]
    cases = [(["--val-split", "train"], "--val-split and --train-split are both 'train'"),
             (["--test-split", "train"], "--test-split and --train-split are both 'train'"),
             (["--group-pattern", "(["], "'([' is not a valid regular expression"),
             (["--memory-budget", "nan"], "nan is not a finite number")]
    for args, msg in cases:  # refused before anything is written
        r = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "x"), *args])
        assert r.exit_code in (1, 2) and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert not (tmp_path / "x").exists()


def test_best_pt_is_the_best_validation_epoch_ties_to_the_lower_loss(tmp_path):
    """best.pt holds the epoch with the best val top-1, the lower val loss among equals; last.pt
    the last epoch, with that choice recorded for --resume."""
    from pipeline.metrics import classification_metrics
    from pipeline.run import RunDir

    run = RunDir(tmp_path / "run")
    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    labels = np.arange(10) % 2
    history, best = [], None
    for epoch, (correct, loss) in enumerate([(5, 1.0), (9, 0.6), (9, 0.4), (7, 0.3), (9, 0.45)], 1):
        probs = np.eye(2)[np.where(np.arange(10) < correct, labels, 1 - labels)]  # `correct` of 10 right
        metrics = classification_metrics(probs.astype(np.float32), labels, loss)
        _, best, improved = run.record_epoch(
            {"kind": "temporal", "classes": ["a", "b"]}, epoch=epoch, metrics=metrics, train_loss=1.0,
            train_top1=0.5, clips=10, seconds=1.0, optimizer=opt, scheduler=sched, scaler=None, history=history,
            best=best, states={"model_state": {"w": torch.tensor([float(epoch)])}}, val_split="val")
        assert improved == (epoch in (1, 2, 3)), epoch
    picked, last = load_checkpoint(run.best), load_checkpoint(run.last)
    assert picked["epoch"] == 3 and picked["model_state"]["w"].item() == 3.0
    assert last["epoch"] == 5 and last["best"]["epoch"] == 3 and last["best"]["top1"] == pytest.approx(0.9)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in rows] == [1, 2, 3, 4, 5]


def test_resume_refuses_a_split_whose_videos_changed(tmp_path):
    """A val or train split with other videos than the run had (a video deleted or added, the
    cache re-extracted under the same name and settings): --resume would pick its best epoch across
    two validation sets, or train on two datasets; it went on silently before."""
    def cache(train: int, val: int) -> Path:
        return separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": train, "val": val, "test": 2})

    train_temporal(cfg(cache(8, 4), tmp_path / "run", epochs=1), progress=False)
    cache(8, 3)
    with pytest.raises(CheckpointError, match=r"last\.pt was validated on other videos than the data has now \(12 "
                                              r"then, 9 now: the dataset or its cache changed since\)"):
        train_temporal(cfg(tmp_path / "c.h5", tmp_path / "run", epochs=2, resume=True), progress=False)
    cache(9, 4)
    with pytest.raises(CheckpointError, match=r"was trained on other videos than the data has now \(24 then, 27 now"):
        train_temporal(cfg(tmp_path / "c.h5", tmp_path / "run", epochs=2, resume=True), progress=False)
    cache(8, 4)  # the data it ran on again
    from pipeline.cache import video_checksum

    with h5py.File(tmp_path / "c.h5", "r+") as f:  # one video extracted again under its name (its file changed)
        end = int(f["train/offsets"][1])
        f["train/features"][:end] = -f["train/features"][:end]
        f["train/checksums"][0] = video_checksum(f["train/features"][:end], f["train/frame_indices"][:end])
    with pytest.raises(CheckpointError, match=r"last\.pt was trained on other features of its 24 videos than the cache "
                                              r"holds now \(extracted again since: their files changed on disk\)"):
        train_temporal(cfg(tmp_path / "c.h5", tmp_path / "run", epochs=2, resume=True), progress=False)
    cache(8, 4)
    r = train_temporal(cfg(tmp_path / "c.h5", tmp_path / "run", epochs=2, resume=True), progress=False)
    assert [h["epoch"] for h in r.history] == [1, 2]


def test_resume_refuses_other_validation_videos_or_another_cache(tmp_path):
    """--resume continues the same experiment or none: a validation set carved another way, or
    another cache, would make the earlier epochs' choice of best.pt meaningless."""
    a = separable_cache(tmp_path / "a.h5", classes=3, per_class={"train": 10, "test": 3})
    b = separable_cache(tmp_path / "b.h5", classes=3, per_class={"train": 10, "test": 3}, dtype="float32")
    train_temporal(cfg(a, tmp_path / "run", epochs=1, val_fraction=0.2), progress=False)
    with pytest.raises(CheckpointError, match="validated on other videos"):
        train_temporal(cfg(a, tmp_path / "run", epochs=2, val_fraction=0.4, resume=True), progress=False)
    with pytest.raises(CheckpointError, match=r"trained on another cache \(feature dtype.*\); resume on that cache, or --overwrite to start over$"):
        train_temporal(cfg(b, tmp_path / "run", epochs=2, val_fraction=0.2, resume=True), progress=False)
    c = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 10, "test": 3}, dim=16)
    with pytest.raises(CheckpointError, match="trained on another cache .feature dim"):  # not "the same options"
        train_temporal(cfg(c, tmp_path / "run", epochs=2, val_fraction=0.2, resume=True), progress=False)
    r = train_temporal(cfg(a, tmp_path / "run", epochs=2, val_fraction=0.2, resume=True), progress=False)
    assert [h["epoch"] for h in r.history] == [1, 2]
    # a run whose last.pt is gone, or is a copy of best.pt: refused, never restarted over best.pt;
    # so are fewer --epochs than done and other training options (none of it rewrites the record)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "last.pt"}
    with pytest.raises(CheckpointError, match=r"is at epoch 2, past --epochs 1: give --epochs 2 or more"):
        train_temporal(cfg(a, run, epochs=1, val_fraction=0.2, resume=True), progress=False)
    with pytest.raises(CheckpointError, match=r"was trained with --lr 0\.\d+, this run asks for 0\.5"):
        train_temporal(cfg(a, run, epochs=3, val_fraction=0.2, lr=0.5, resume=True), progress=False)
    # other eval clips: best.pt would be picked across epochs scored two ways (accepted before)
    clips = load_checkpoint(run / "last.pt")["train_config"]["eval_clips"]
    with pytest.raises(CheckpointError, match=rf"was trained with --eval-clips {clips}, this run asks for {clips + 1};"):
        train_temporal(cfg(a, run, epochs=3, val_fraction=0.2, eval_clips=clips + 1, resume=True), progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.name != "last.pt"} == before
    (run / "last.pt").write_bytes((run / "best.pt").read_bytes())
    with pytest.raises(CheckpointError, match=r"last\.pt is not a last\.pt that --resume can continue \(no history"):
        train_temporal(cfg(a, run, epochs=3, val_fraction=0.2, resume=True), progress=False)
    (run / "last.pt").unlink()
    with pytest.raises(ConfigError, match="holds a run .best.pt. but no last.pt to resume from; use --overwrite"):
        train_temporal(cfg(a, run, epochs=3, val_fraction=0.2, resume=True), progress=False)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_training_needs_two_classes_and_names_classes_it_never_saw(tmp_path, caplog):
    """A class folder only one split has (``walk`` in test next to ``Walk`` in train) is a class the
    model never sees: a warning. A training split of one class (a split file lost) is refused."""
    from synthetic import provenance

    from pipeline.cache import VideoRecord, write_cache
    from pipeline.errors import CacheError
    from pipeline.train import load_stage_two

    rng = np.random.default_rng(0)

    def videos(split, labels):
        return iter([VideoRecord(f"{split}/v{i}", c, rng.normal(size=(8, 4)).astype("float16"), np.arange(8), 30.0)
                     for i, c in enumerate(labels)])

    one = write_cache(tmp_path / "one.h5", provenance(["a", "b", "c"], 4),
                      {"train": videos("train", [0] * 6), "test": videos("test", [0, 1])})
    with pytest.raises(CacheError, match=r"^split 'train' of .*one\.h5 has videos of 1 class\(es\) \(a\); "
                                         r"a classifier needs two or more"):
        load_stage_two(one)
    three = write_cache(tmp_path / "three.h5", provenance(["a", "b", "c"], 4),
                        {"train": videos("train", [0, 1] * 6), "val": videos("val", [0, 1, 2]),
                         "test": videos("test", [0, 1, 2, 2])})
    load_stage_two(three).close()
    assert "1 video(s) of split 'val' are of classes with no video in 'train' (c)" in caplog.text
    assert "2 video(s) of split 'test' are of classes with no video in 'train' (c)" in caplog.text
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(one), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and r.output.splitlines()[-1].startswith("error: split 'train' of")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top1_agrees_with_the_confusion_matrix_on_tied_probabilities(dtype):
    """Tied probabilities (a uniform head, a saturated fp16 softmax): top-1 took any of the tied
    classes (argpartition) while the confusion matrix took the first (argmax), so the two could
    disagree in one test.json (0.096 against 0.087 in a reviewer's example)."""
    from pipeline.metrics import classification_metrics, topk_accuracy

    rng = np.random.default_rng(0)
    probs = rng.integers(0, 3, (1000, 10)).astype(dtype)  # many ties
    target = rng.integers(0, 10, 1000)
    m = classification_metrics(probs, target, 0.0)
    assert m["top1"] == pytest.approx(np.trace(np.array(m["confusion"])) / 1000)
    assert m["top1"] == pytest.approx(np.mean(probs.argmax(1) == target))
    # top-5 breaks ties the same way: never under top-1 (argpartition kept any 5 of 7 tied classes)
    assert m["top5"] >= m["top1"]
    hit1 = probs.argmax(1) == target
    order = np.argsort(-probs, axis=1, kind="stable")[:, :5]  # stable: first of tied classes first
    hit5 = (order == target[:, None]).any(1)
    assert (hit5 >= hit1).all() and m["top5"] == pytest.approx(hit5.mean())
    seven = np.zeros((1, 16), dtype)
    seven[0, [2, 5, 8, 10, 11, 12, 15]] = 1 / 7  # the reviewer's example: argmax picks 2
    assert topk_accuracy(seven, np.array([2]), 5) == 1.0 and topk_accuracy(seven, np.array([15]), 5) == 0.0
    assert topk_accuracy(seven, np.array([2]), 1) == 1.0 and topk_accuracy(seven, np.array([5]), 1) == 0.0
    nan = np.array([[np.nan] * 4, [.1, .2, .3, .4], [np.nan, .5, np.nan, .5]])  # NaN: as argmax ranks it (first)
    for k in (1, 2):  # row 0: class 0 (the first NaN) is top-1; row 2: classes 0 and 2 rank above class 1
        assert [topk_accuracy(nan[i:i + 1], np.array([t]), k) for i, t in enumerate((3, 3, 1))] == [0.0, 1.0, 0.0]
    assert topk_accuracy(nan[:1], np.array([0]), 1) == 1.0 and topk_accuracy(nan, np.array([3, 3, 1]), 1) == \
        np.mean(nan.argmax(1) == [3, 3, 1])


def test_metrics_of_a_class_without_videos_are_valid_json():
    """per-class accuracy of a class the split has no video of is null: test.json stays JSON that
    strict parsers (JavaScript's, Go's) read; NaN is not JSON."""
    from pipeline.metrics import classification_metrics

    probs = np.eye(3, dtype=np.float32)[[0, 1, 1]]
    m = classification_metrics(probs, np.array([0, 1, 0]), 0.5)
    assert m["per_class_acc"] == [0.5, 1.0, None] and m["support"] == [2, 1, 0]
    assert m["mean_class_acc"] == pytest.approx(0.75)
    json.dumps(m, allow_nan=False)


def test_one_run_per_folder_and_overwrite_replaces_the_whole_run(tmp_path):
    """A second process on the same --out is refused before it touches anything; --overwrite
    removes every file of the earlier run at its first write, so an interrupted one never leaves
    the old run's test.json beside its own checkpoints; interrupted sooner, the old run is whole."""
    from pipeline.files import OutputInUseError, exclusive

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    out = tmp_path / "run"
    train_temporal(cfg(cache, out, epochs=1), progress=False)
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert {"test.json", "confusion_test.png", "per_class_test.csv"} <= set(old)
    from pipeline.files import in_use

    assert not in_use(out)
    with exclusive(out, "--out"):  # as another process holds it
        assert in_use(out)
        with pytest.raises(OutputInUseError, match=rf"^--out {out} is in use by another process: wait for it"):
            train_temporal(cfg(cache, out, epochs=1, overwrite=True), progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == old

    class Stop(Exception):
        pass

    def stop(*_):
        raise Stop

    runs = []
    with pytest.raises(Stop):  # interrupted before its first write
        train_temporal(cfg(cache, out, epochs=3, hidden=16, overwrite=True), progress=False,
                       on_start=lambda run: (runs.append(run), stop()))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == old
    assert runs[0].resume_hint() == f"the run in {out} was left as it was; rerun the same command to start over"
    with pytest.raises(Stop):  # interrupted after its first epoch
        train_temporal(cfg(cache, out, epochs=3, hidden=16, overwrite=True), progress=False, on_epoch=stop,
                       on_start=runs.append)
    assert runs[1].resume_hint() == f"{out / 'last.pt'} holds epoch 1; rerun with --resume instead of --overwrite " \
                                    "to continue"
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.json", "confusion.png", "curves.png", "last.pt",
                                                     "metrics.jsonl", "per_class.csv"]
    assert load_checkpoint(out / "best.pt")["model_config"]["hidden"] == 16
    with pytest.raises(ConfigError, match="--resume continues the run in --out and --overwrite starts it over"):
        train_temporal(cfg(cache, out, epochs=3, hidden=16, overwrite=True, resume=True), progress=False)


def test_resume_for_more_epochs_warns_that_the_schedule_changes(tmp_path, caplog):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    out = tmp_path / "run"
    train_temporal(cfg(cache, out, epochs=2), progress=False)
    train_temporal(cfg(cache, out, epochs=3, resume=True), progress=False)
    assert f"{out / 'last.pt'} was started for 2 epochs: from epoch 3 on, its learning-rate schedule is that of a " \
           "3-epoch run" in caplog.text


def test_resume_in_other_arithmetic_is_said(tmp_path, caplog):
    """A run continued on another device or --precision (a GPU run resumed on a CPU) goes on, with
    a warning: its epochs from then on are not the uninterrupted run's."""
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    out = tmp_path / "run"
    train_temporal(cfg(cache, out, epochs=2), progress=False)
    last = out / "last.pt"
    ck = torch.load(last, weights_only=False)
    assert ck["compute"] == "cpu float32"
    train_temporal(cfg(cache, out, epochs=3, resume=True), progress=False)
    assert "another device or --precision" not in caplog.text
    ck = torch.load(last, weights_only=False)
    torch.save({**ck, "compute": "cuda bfloat16"}, last)
    r = train_temporal(cfg(cache, out, epochs=4, resume=True), progress=False)
    assert f"{last} trained its 3 epoch(s) in cuda bfloat16, this run continues in cpu float32 (another device or " \
           "--precision)" in caplog.text
    assert [h["epoch"] for h in r.history] == [1, 2, 3, 4]


def test_resume_from_a_damaged_last_pt_says_what_to_do(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    out = tmp_path / "run"
    train_temporal(cfg(cache, out, epochs=1), progress=False)
    last = out / "last.pt"
    last.write_bytes(last.read_bytes()[:-100])  # a disk fault: its writes are atomic
    best = (out / "best.pt").read_bytes()
    r = CliRunner().invoke(main, ["-q", "train-temporal", "--cache", str(cache), "--out", str(out), "--resume"])
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{last} is not a checkpoint this tool can load safely: a damaged or incomplete torch.save file; " \
           "--resume cannot continue from it: use --overwrite to start over (move best.pt away first" in r.stderr
    assert (out / "best.pt").read_bytes() == best


def test_overwrite_removes_only_a_runs_own_files(tmp_path):
    from pipeline.run import RunDir, remove_run_files

    out = tmp_path / "runs"
    (out / "tensorboard" / "old_experiment").mkdir(parents=True)  # a user's shared log folder
    (out / "tensorboard" / "old_experiment" / "events.out.tfevents.1").write_bytes(b"x")
    (out / "trials").mkdir()
    (out / "trials" / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with RunDir(out, overwrite=True) as run:  # the folder holds no run: nothing is removed
        run.start()
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    for name in ("best.pt", "last.pt", "test.json", "tensorboard/events.out.tfevents.2", "trials/t00/best.pt"):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    remove_run_files(out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == [
        "tensorboard", "tensorboard/old_experiment", "tensorboard/old_experiment/events.out.tfevents.1", "trials",
        "trials/notes.txt"]


def test_lock_falls_back_to_a_warning_where_the_filesystem_has_no_flock(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    from pipeline.files import exclusive

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with exclusive(tmp_path / "f.h5", "--output"):
        pass
    assert f"cannot lock --output {tmp_path / 'f.h5'} on this filesystem (No locks available)" in caplog.text
    assert not (tmp_path / "f.h5.lock").exists()


def test_a_lock_file_left_by_another_users_killed_run_is_taken_over(tmp_path, monkeypatch):
    """Killed, a run leaves its unlocked <cache>.lock behind, owned by its user: another user
    cannot open it to write (simulated: this test runs as root), only to read and lock it."""
    import pipeline.files
    from pipeline.files import exclusive

    lock = tmp_path / "f.h5.lock"
    lock.write_text("4242@otherhost")
    real_open = os.open

    def foreign(path, flags, *a):
        if Path(path) == lock and flags & os.O_RDWR and lock.exists() and lock.read_text() == "4242@otherhost":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *a)

    monkeypatch.setattr(pipeline.files.os, "open", foreign)
    with exclusive(tmp_path / "f.h5", "--output"):
        assert lock.read_text().startswith(f"{os.getpid()}@")
    assert not lock.exists()



def test_options_a_cpu_run_does_not_use_are_said(tmp_path, caplog):
    """--precision bf16 on CPU (stage two trains in fp32 there) and --memory-budget without --load
    auto (it sizes auto's choice) were dropped without a word; the run still goes on."""
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    with caplog.at_level("WARNING"):
        r = train_temporal(cfg(cache, tmp_path / "r", epochs=1, precision="bf16", load="memory", memory_budget=1.0),
                           progress=False)
    assert "--precision bf16 is for CUDA: training on cpu runs in fp32" in caplog.text
    assert "--memory-budget is for --load auto, which it sizes; --load memory ignores it" in caplog.text
    assert load_checkpoint(r.out / "last.pt")["compute"] == "cpu float32"
    caplog.clear()
    with caplog.at_level("WARNING"):
        train_temporal(cfg(cache, tmp_path / "r2", epochs=1, precision="fp32", memory_budget=1.0), progress=False)
    assert "--precision" not in caplog.text and "--memory-budget" not in caplog.text


def test_seq_len_longer_than_the_videos_costs_no_memory(tmp_path, caplog):
    """A batch was padded to --seq-len (B x S x D floats: 4 GB a batch at --seq-len 100000 for
    22-frame videos); it is now cut to its longest clip, which changes no number."""
    from pipeline.engine import FeatureBank, averaged_probs, epoch_batches

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3}, length=(4, 9))
    with FeatureCache(cache) as c:
        d = c.load_split("train")
    bank = FeatureBank.from_arrays(d.features, d.offsets, d.labels, torch.device("cpu"))
    widths = [(x.shape[1], int(n.max())) for x, n, _ in epoch_batches(
        bank, seq_len=100_000, sampler="segment", batch_size=4, rng=np.random.default_rng(0))]
    assert all(w == n <= 9 for w, n in widths), widths
    seen = []
    averaged_probs([lambda x, n: seen.append(x.shape[1]) or torch.ones(len(x), 3)], bank, seq_len=100_000, num_clips=2)
    assert seen and max(seen) <= 9
    from pipeline.sampling import sample  # nor an (N, seq_len) array of positions per epoch or clip
    for kind in ("segment", "random", "uniform"):
        pos, n = sample(kind, np.array([4, 9, 7]), 100_000, np.random.default_rng(0))
        assert pos.shape == (3, 9) and list(n) == [4, 9, 7]
        assert sample(kind, np.array([4, 9, 7]), 9, np.random.default_rng(0))[0].tolist() == pos.tolist()
    with caplog.at_level("WARNING"):  # learned positions that never train: said
        train_temporal(cfg(cache, tmp_path / "t", epochs=1, seq_len=50, head="transformer", hidden=16, num_heads=2),
                       progress=False)
    assert "--seq-len 50 is over twice the longest training video (8 frames): the transformer head learns 50" \
        in caplog.text
    short = train_temporal(cfg(cache, tmp_path / "a", epochs=2, seq_len=9), progress=False)
    huge = train_temporal(cfg(cache, tmp_path / "b", epochs=2, seq_len=100_000), progress=False)
    assert [h["val_loss"] for h in huge.history] == [h["val_loss"] for h in short.history]


def test_evaluate_into_a_run_folder_holds_it_and_overwrite_clears_what_it_wrote(tmp_path):
    """`evaluate --out RUN` wrote into a run folder that another process held, and `--overwrite`
    left its confusion_<split>.png and per_class_<split>.csv, about a model no longer there."""
    from pipeline.files import OutputInUseError, exclusive

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    out = tmp_path / "run"
    train_temporal(cfg(cache, out, epochs=1), progress=False)
    with exclusive(out, "--out"):  # as a run in progress holds it
        with pytest.raises(OutputInUseError, match=rf"^--out {out} is in use by another process"):
            evaluate_checkpoint(out / "best.pt", cache, "train", out=out)
    assert not (out / "confusion_train.png").exists()
    evaluate_checkpoint(out / "best.pt", cache, "train", out=out)
    assert (out / "confusion_train.png").is_file() and (out / "per_class_train.csv").is_file()
    mine = {"confusion_notes.txt": "mine", "confusion_matrix_for_paper.png": "png", "per_class_notes.csv": "csv"}
    for name, text in mine.items():  # a user's files of similar names, none of them an evaluation's pair
        (out / name).write_text(text)
    train_temporal(cfg(cache, out, epochs=1, hidden=16, overwrite=True), progress=False)
    assert not (out / "confusion_train.png").exists() and not (out / "per_class_train.csv").exists()
    assert {n: (out / n).read_text() for n in mine} == mine and (out / "test.json").is_file()


def test_a_carve_too_small_to_pick_an_epoch_on_is_said(tmp_path, caplog):
    """A training split with one video in most classes carves one or two videos for all of them:
    the best epoch was picked on that without a word."""
    from pipeline.cache import VideoRecord, write_cache
    from synthetic import provenance

    rng = np.random.default_rng(0)
    counts = {"train": [3, 1, 1, 1], "test": [1, 1, 1, 1]}
    splits = {s: iter([VideoRecord(f"{s}/c{c}/v{k}", c, rng.normal(0, 1, (6, 32)).astype("float16"), np.arange(6), 30.0)
                       for c, n in enumerate(ns) for k in range(n)]) for s, ns in counts.items()}
    cache = write_cache(tmp_path / "c.h5", provenance([f"c{c}" for c in range(4)], 32, "float16"), splits)
    with caplog.at_level("WARNING"):
        r = train_temporal(cfg(cache, tmp_path / "r", epochs=1), progress=False)
    assert r.val_split.startswith("1 videos carved from 'train' (10% of each class, at least one video and never a "
                                  "class's last")
    assert "the best epoch is picked on 1 carved video(s) for 4 classes, too few to tell epochs apart" in caplog.text
