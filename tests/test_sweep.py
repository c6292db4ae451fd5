"""The sweep: trains a grid at once, picks on validation, stops poor trials, survives a kill."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import REPO
from synthetic import reversal_cache, separable_cache

from cli import main
from pipeline.config import TemporalConfig
from pipeline.errors import ConfigError
from pipeline.model import load_model
from pipeline.sweep import SweepConfig, check_grid, expand_grid, planned_trial_epochs, rung_ends, sweep
from pipeline.train import evaluate_checkpoint


def base(cache: Path, out: Path, **kw) -> TemporalConfig:
    return TemporalConfig(cache=str(cache), out=str(out), **{**dict(epochs=6, batch_size=16, hidden=16, dropout=0.1,
                                                                    seq_len=8, warmup_epochs=0.5, device="cpu",
                                                                    num_heads=2, val_fraction=0.2), **kw})


def test_grid_expansion_drops_what_a_head_does_not_use(caplog):
    cfg = SweepConfig(base=base(Path("c.h5"), Path("o")), grids=((("head", ("lstm", "mean")), ("hidden", (8, 16)),
                                                                  ("bidirectional", (False, True))),))
    trials = expand_grid(cfg)
    assert [t.label for t in trials] == ["lstm hidden 8 uni", "lstm hidden 8 bi", "lstm hidden 16 uni",
                                         "lstm hidden 16 bi", "mean"]
    assert [t.id for t in trials] == ["t0", "t1", "t2", "t3", "t4"]
    assert rung_ends(30, 2, 3) == [2, 6, 18, 30] and rung_ends(4, 5, 3) == [4]
    assert planned_trial_epochs(9, [2, 6, 18], 3) == 9 * 2 + 3 * 4 + 1 * 12
    with pytest.raises(ConfigError, match="cannot sweep over 'colour'"):
        SweepConfig(base=cfg.base, grids=((("colour", ("red",)),),))
    two = SweepConfig(base=cfg.base, grids=((("head", ("lstm",)), ("hidden", (8, 16))), (("head", ("mean",)),)))
    assert [t.label for t in expand_grid(two)] == ["lstm hidden 8", "lstm hidden 16", "mean"]
    # a grid that cannot run is refused, by trial, before any file is read (c.h5 does not exist)
    with pytest.raises(ConfigError, match=r"^sweep trial 'attention hidden 8 num-heads 3': --hidden \(8\) must be "
                                          r"divisible by --num-heads \(3\) for the attention head; a --spec list"):
        check_grid(SweepConfig(base=cfg.base, grids=((("head", ("attention",)), ("hidden", (8, 12)),
                                                      ("num_heads", (2, 3))),)))
    with pytest.raises(ConfigError, match=r"^sweep trial 'transformer': --hidden \(10\) must be divisible by "
                                          r"--num-heads \(4\) for the transformer head$"):  # nothing to pair
        check_grid(SweepConfig(base=base(Path("c.h5"), Path("o"), hidden=10, num_heads=4),
                               grids=((("head", ("transformer",)),),)))
    # the attention heads' count is an axis too; a recurrent head has none, so it collapses there
    heads = SweepConfig(base=cfg.base, grids=((("head", ("transformer", "gru")), ("num_heads", (2, 4))),))
    assert [(t.label, t.cfg.num_heads) for t in expand_grid(heads)] == [
        ("transformer num-heads 2", 2), ("transformer num-heads 4", 4), ("gru", 4)]
    check_grid(heads)
    assert "changes no trial" not in caplog.text
    check_grid(SweepConfig(base=cfg.base, grids=((("head", ("lstm", "mean")), ("num_heads", (2, 4))),)))
    assert "--num-heads 2,4 changes no trial of the sweep: the lstm, mean heads do not use it" in caplog.text


def test_sweep_picks_an_order_aware_head_when_order_decides(tmp_path):
    cache = reversal_cache(tmp_path / "rev.h5")
    # A video and its time reversal (ab/v3, ba/v3) are one source: the validation carve holds them out
    # together, else an order-blind head scores on the twin it trained on.
    pairs = r"(v\d+)$"
    cfg = SweepConfig(base=base(cache, tmp_path / "sw", epochs=12, lr=3e-3, group_pattern=pairs),
                      grids=((("head", ("mean", "lstm", "transformer")), ("lr", (3e-3,))),), eta=2, min_epochs=3)
    r = sweep(cfg, progress=False)
    assert r.winner["config"].split()[0] in ("lstm", "transformer")
    mean = next(x for x in r.leaderboard if x["config"] == "mean")
    assert mean["best_val_top1"] < r.winner["best_val_top1"] and mean["status"] == "stopped at 3"
    assert r.test is not None and r.test["top1"] >= 0.9  # the winner, once, on the held-out split
    # The winner's best.pt is an ordinary train-temporal checkpoint.
    m = load_model(tmp_path / "sw" / "best.pt")
    assert m.head_config.arch == r.winner["config"].split()[0]
    ev = evaluate_checkpoint(tmp_path / "sw" / "best.pt", cache, "test", device="cpu")
    assert ev.metrics["top1"] == pytest.approx(r.test["top1"]) and ev.seen == ""
    # it records what it trained and was picked on, as train-temporal's do: evaluate on train says so
    assert evaluate_checkpoint(tmp_path / "sw" / "best.pt", cache, "train", device="cpu").seen.startswith(
        "this split holds the ")
    rows = list(csv.DictReader(open(tmp_path / "sw" / "leaderboard.csv")))
    assert [row["id"] for row in rows] == [x["id"] for x in r.leaderboard]
    assert (tmp_path / "sw" / "leaderboard.png").stat().st_size > 0
    # Trained together, each trial is what it would be alone: batches and dropout do not depend on the others.
    alone = sweep(SweepConfig(base=base(cache, tmp_path / "one", epochs=12, lr=3e-3, group_pattern=pairs),
                              grids=((("head", ("lstm",)),),), eta=2, min_epochs=3), progress=False)
    lstm = next(x for x in r.leaderboard if x["config"] == "lstm")
    if lstm["status"] == "finished":
        assert alone.winner["best_val_top1"] == lstm["best_val_top1"]
        assert alone.winner["best_val_loss"] == pytest.approx(lstm["best_val_loss"], rel=1e-5)


def test_evaluate_knows_what_a_sweep_winner_was_picked_and_trained_on(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "val": 3, "test": 3})
    sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=1), grids=((("hidden", (8,)),),), min_epochs=1),
          progress=False)
    seen = {s: evaluate_checkpoint(tmp_path / "sw" / "best.pt", cache, s, device="cpu").seen
            for s in ("train", "val", "test")}
    assert seen["val"].startswith("the best epoch of this model was picked on these 9 videos")
    assert seen["train"] == "this model was trained on these 18 videos" and seen["test"] == ""


def test_rerun_with_another_grid_is_refused(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 8, "test": 3})
    sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=2), grids=((("hidden", (8,)),),), min_epochs=1),
          progress=False)
    with pytest.raises(ConfigError, match="holds a sweep of another grid, cache or options; rerun with the same"):
        sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=2), grids=((("hidden", (8, 16)),),),
                          min_epochs=1), progress=False)
    # another --seed carves another validation set: named as such, not as a changed dataset
    with pytest.raises(ConfigError, match=r"holds a sweep run with --seed 0 \(here --seed 2\); rerun with those to "
                                          r"resume it, or --overwrite to start over$"):
        sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=2, seed=2), grids=((("hidden", (8,)),),),
                          min_epochs=1), progress=False)
    r = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--out", str(tmp_path / "x"), "--hidden", "8,abc"])
    assert r.exit_code == 2 and "'abc' is not a valid value (int)" in r.stderr
    # A grid that cannot run is refused before --overwrite removes the sweep that is there.
    kept = {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()}
    assert tmp_path / "sw" / "best.pt" in kept and tmp_path / "sw" / "sweep_state.pt" in kept
    spec = tmp_path / "spec.json"
    spec.write_text('{"hidden": [8, 8.5]}')
    specs = {name: tmp_path / f"{name}.json" for name in ("empty_list", "empty_grid", "twice", "no_lr", "zero")}
    specs["no_lr"].write_text('{"lr": []}')
    specs["zero"].write_text('[{"hidden": [8]}, {"hidden": [16, 0]}]')
    specs["empty_list"].write_text("[]")
    specs["empty_grid"].write_text("{}")
    specs["twice"].write_text('{"head": ["lstm"], "head": ["gru"]}')
    bad_grids = [(["--head", "transformer", "--hidden", "8,10"], "sweep trial 'transformer hidden 10': --hidden (10) "
                  "must be divisible by --num-heads (4) for the transformer head; a --spec list of grids pairs"),
                 (["--head", "attention,gru", "--hidden", "8,12", "--num-heads", "2,3"],
                  "sweep trial 'attention hidden 8 num-heads 3': --hidden (8) must be divisible by --num-heads (3)"),
                 (["--hidden", "-3"], "hidden must be >= 1, got -3"),
                 (["--dropout", "1.5"], "dropout must be in [0, 1), got 1.5"),
                 (["--lr", "0"], "lr must be > 0 and at most 1, got 0.0"),
                 (["--eval-clips", "1,1000"], "eval_clips must be at most 100, got 1000"),
                 (["--lr", "inf"], "'inf' is not a valid value (a finite number)"),
                 (["--lr", "1e38"], "lr must be > 0 and at most 1, got 1e+38"),
                 (["--hidden", ""], "no values given"),
                 (["--spec", str(spec)], "spec.json: axis 'hidden': '8.5' is not a valid value (int)"),
                 (["--spec", str(specs["empty_list"])], "empty_list.json: an empty list of grids"),
                 (["--spec", str(specs["empty_grid"])], "empty_grid.json: an empty grid {}"),
                 (["--spec", str(specs["twice"])], "twice.json: axis 'head' is given twice in one grid"),
                 (["--spec", str(specs["no_lr"])], "no_lr.json: axis 'lr' has no values"),
                 (["--spec", str(specs["zero"])], "zero.json: axis 'hidden': hidden must be >= 1, got 0")]
    for args, msg in bad_grids:
        r = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--out", str(tmp_path / "sw"), "--epochs", "2",
                                      "--min-epochs", "1", "--overwrite", *args])
        assert r.exit_code in (1, 2) and "Traceback" not in r.stderr and msg in r.stderr, (args, r.stderr)
    assert {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()} == kept
    # refused before writing anything: the --out folder the command would have made is not left behind
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new" / "sw", tmp_path / "empty"):
        r = CliRunner().invoke(main, ["sweep", "--cache", str(cache), "--out", str(out), "--head", "transformer",
                                      "--hidden", "10"])
        assert r.exit_code == 1 and "must be divisible by --num-heads" in r.stderr
    assert not (tmp_path / "new").exists() and (tmp_path / "empty").is_dir()  # a folder that was there stays
    for cmd in (["train-temporal", "--cache", str(cache)], ["finetune-end-to-end", "--data-dir", str(tmp_path / "nope")]):
        r = CliRunner().invoke(main, [*cmd, "--out", str(tmp_path / "run"), "--head", "transformer", "--hidden", "10",
                                      "--num-heads", "3", "--weights" if "finetune" in cmd[0] else "--epochs", "1"])
        assert r.exit_code == 1 and "Traceback" not in r.stderr and not (tmp_path / "run").exists(), (cmd, r.stderr)
    # A valid --overwrite removes every file of the sweep there before its first epoch: interrupted
    # then, it leaves no leaderboard or test.json that describes trials that are gone.
    sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=2), grids=((("hidden", (8,)),),), min_epochs=1),
          progress=False)
    assert {"leaderboard.csv", "leaderboard.png", "sweep.json", "test.json"} <= {p.name for p in (tmp_path / "sw").iterdir()}

    def stop(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=2), grids=((("hidden", (8, 16)),),), min_epochs=1,
                          overwrite=True), progress=False, on_epoch=stop)
    assert sorted(p.name for p in (tmp_path / "sw").iterdir()) == ["sweep_state.pt", "trials"]


def test_sweep_on_a_replaced_cache_is_refused_and_a_moved_folder_resumes(tmp_path):
    """A sweep rerun (or resumed) after its cache file was replaced by one of other features would
    report the new features' test numbers for trials trained on the old ones: refused, naming the
    difference, with its files as they were. A sweep folder moved elsewhere resumes as it was."""
    import shutil

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 8, "test": 3})
    cfg = SweepConfig(base=base(cache, tmp_path / "sw", epochs=2), grids=((("hidden", (8, 16)),),), min_epochs=1)
    first = sweep(cfg, progress=False)
    shutil.copytree(tmp_path / "sw", tmp_path / "moved")
    kept = {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()}
    separable_cache(cache, classes=3, per_class={"train": 8, "test": 3}, seed=1, dtype="float32")
    with pytest.raises(ConfigError, match=rf"^{tmp_path / 'sw'} holds a sweep on other features than the cache has "
                                          r'now \(feature dtype "float16" vs "float32"\); resume it on the cache it ran on'):
        sweep(cfg, progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()} == kept
    # the same features, but a training split with a video more (the dataset changed, re-extracted)
    separable_cache(cache, classes=3, per_class={"train": 9, "test": 3})
    with pytest.raises(ConfigError, match=rf"^the sweep in {tmp_path / 'sw'} was trained on other videos than the data "
                                          r"has now \(\d+ then, \d+ now: the dataset or its cache changed since\)"):
        sweep(cfg, progress=False)
    assert {p: p.read_bytes() for p in (tmp_path / "sw").rglob("*") if p.is_file()} == kept
    separable_cache(cache, classes=3, per_class={"train": 8, "test": 3})  # the same cache again
    moved = sweep(SweepConfig(base=base(cache, tmp_path / "moved", epochs=2), grids=cfg.grids, min_epochs=1),
                  progress=False)
    assert moved.leaderboard == first.leaderboard and moved.test == first.test


def test_a_trial_whose_weights_blow_up_in_its_last_step_fails(tmp_path, monkeypatch):
    """Weights that went non-finite in an epoch's last step give a NaN validation loss (every
    training loss was finite): that trial fails, and that epoch is never recorded, picked or
    saved (here its first, so it has no best epoch to compete with; one that fails later keeps
    the best finite epoch it reached, which was picked on validation like any other)."""
    import math

    import pipeline.sweep as S

    train = S.train_heads_one_epoch

    victim = []

    def last_step_blows_up(heads, *a, **k):
        stats = train(heads, *a, **k)
        victim[:] = victim or [max(heads, key=lambda h: sum(p.numel() for p in h.model.parameters()))]  # hidden 16
        with torch.no_grad():
            for p in victim[0].model.parameters():
                p.fill_(float("nan"))
        return stats

    monkeypatch.setattr(S, "train_heads_one_epoch", last_step_blows_up)
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 8, "test": 3})
    r = sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=2), grids=((("hidden", (8, 16)),),), min_epochs=2),
              progress=False)
    rows = {row["hidden"]: row for row in r.leaderboard}
    assert rows[16]["status"] == "failed" and rows[16]["failed"] == "validation loss became nan in epoch 1"
    assert r.winner["hidden"] == 8 and math.isfinite(r.winner["best_val_loss"])
    assert all(torch.isfinite(v).all() for v in load_model(tmp_path / "sw" / "best.pt").head.state_dict().values()
               if v.is_floating_point())


def _sweep_cmd(cache: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "-q", "sweep", "--cache", str(cache), "--out", str(out),
            "--head", "lstm,gru,mean", "--hidden", "16,32", "--epochs", "8", "--min-epochs", "2", "--eta", "2",
            "--batch-size", "8", "--seq-len", "6", "--device", "cpu", "--no-progress"]


def test_sweep_killed_and_rerun_ends_with_the_same_leaderboard(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 16, "test": 4}, noise=2.0)
    full = subprocess.run(_sweep_cmd(cache, tmp_path / "full"), capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr
    state = tmp_path / "part" / "sweep_state.pt"
    p = subprocess.Popen(_sweep_cmd(cache, tmp_path / "part"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        if state.exists() and torch.load(state, weights_only=True)["epoch"] >= 3:
            break
        time.sleep(0.05)
    assert p.poll() is None, "the sweep ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)  # mid-epoch 4, after the first rung
    p.wait()
    rerun = subprocess.run(_sweep_cmd(cache, tmp_path / "part"), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    a = (tmp_path / "full" / "leaderboard.csv").read_text()
    b = (tmp_path / "part" / "leaderboard.csv").read_text()
    assert a == b
    assert rerun.stdout.split("leaderboard:")[1].split(";")[0] == full.stdout.split("leaderboard:")[1].split(";")[0]


def test_rerun_of_a_finished_sweep_keeps_its_best_pt_when_the_winners_trial_file_is_gone(tmp_path):
    """A finished sweep's rerun copies the winning trial's best.pt to OUT/best.pt again. A trial file
    damaged or deleted since is written again where the last snapshot holds it (it improved since
    the one before); otherwise it is named in one line, and OUT/best.pt stays as it was."""
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 8, "test": 3})
    out = tmp_path / "sw"
    args = ["sweep", "--cache", str(cache), "--out", str(out), "--head", "lstm,mean", "--hidden", "16", "--epochs",
            "2", "--min-epochs", "1", "--seq-len", "4", "--device", "cpu", "--no-progress"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.stderr
    kept = (out / "best.pt").read_bytes()
    winner = next(d for d in (out / "trials").iterdir() if (d / "best.pt").read_bytes() == kept)
    state = torch.load(out / "sweep_state.pt", weights_only=True)
    held = state["trials"][winner.name]["best_ckpt"]
    assert held is not None and held["epoch"] == 2  # improved in the last epoch: the last snapshot holds it
    (winner / "best.pt").write_bytes(kept[:100])  # a disk fault, a partial copy
    assert CliRunner().invoke(main, args).exit_code == 0
    mended, was = (torch.load(f, weights_only=True) for f in (winner / "best.pt", out / "best.pt"))
    assert mended["epoch"] == was["epoch"] == 2 and mended["model_state"].keys() == held["model_state"].keys()
    assert all(torch.equal(mended["model_state"][k], v) for k, v in held["model_state"].items())
    # a snapshot without it (the trial improved before the one before): named, OUT/best.pt kept
    for t in state["trials"].values():
        t["best_ckpt"] = None
    torch.save(state, out / "sweep_state.pt")
    kept = (out / "best.pt").read_bytes()
    (winner / "best.pt").write_bytes(kept[:100])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {winner / 'best.pt'} is not a checkpoint this tool can load safely: a damaged or incomplete "
        f"torch.save file; it is the winning trial's; {out / 'best.pt'} is kept as it was; rerun the sweep with "
        "--overwrite to train it again"), r.stderr
    assert (out / "best.pt").read_bytes() == kept
    shutil.rmtree(winner)
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {winner / 'best.pt'}, the checkpoint of the winning trial {winner.name}, is missing; "
        f"{out / 'best.pt'} is kept as it was; rerun the sweep with --overwrite to train it again"), r.stderr
    assert (out / "best.pt").read_bytes() == kept
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0


def test_trial_files_never_hold_an_epoch_the_snapshot_does_not(tmp_path):
    """A trial's best.pt is written with the snapshot that covers its epoch, so a sweep stopped
    between snapshots leaves every trial file at the snapshot's best epoch: a resume's replay need
    not repeat the stopped run bit for bit (a GPU need not). Resumed, it ends as an uninterrupted
    sweep does, every trial file at its leaderboard epoch."""
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 16, "test": 4}, noise=2.0)
    grid = dict(grids=((("head", ("lstm", "gru", "mean")), ("hidden", (8, 16))),), min_epochs=2, eta=3)
    full = sweep(SweepConfig(base=base(cache, tmp_path / "full"), **grid), progress=False)

    class Stop(Exception):
        pass

    def stop_after_4(epoch, trials):
        if epoch == 4:
            raise Stop

    with pytest.raises(Stop):  # rungs end at 2 and 6: epochs 3 and 4 are in no snapshot
        sweep(SweepConfig(base=base(cache, tmp_path / "part"), **grid), progress=False, on_epoch=stop_after_4)
    state = torch.load(tmp_path / "part" / "sweep_state.pt", weights_only=True)
    assert state["epoch"] == 2
    for tid, t in state["trials"].items():
        assert torch.load(tmp_path / "part" / "trials" / tid / "best.pt", weights_only=True)["epoch"] == \
            t["best"]["epoch"] <= 2
    assert any(row["best_epoch"] > 2 for row in full.leaderboard)  # so trials did improve in epochs 3-4
    resumed = sweep(SweepConfig(base=base(cache, tmp_path / "part"), **grid), progress=False)
    assert resumed.leaderboard == full.leaderboard
    for row in resumed.leaderboard:
        ck = torch.load(tmp_path / "part" / "trials" / row["id"] / "best.pt", weights_only=True)
        assert ck["epoch"] == row["best_epoch"] and isinstance(ck["sweep_seed"], int)  # the seed it trained with
        assert sorted(ck["seen_videos"]) == ["train", "val"]  # for evaluate's warnings, as a run's own best.pt


def test_sweep_says_positions_past_the_longest_video_never_train(tmp_path, caplog):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 2}, length=(4, 9))
    with caplog.at_level("WARNING"):
        sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=1, hidden=8, num_heads=2),
                          grids=((("head", ("lstm", "transformer")), ("seq_len", (8, 40))),), min_epochs=1),
              progress=False)
    said = [r.getMessage() for r in caplog.records if "never train" in r.getMessage()]
    assert said == ["--seq-len 40 is over twice the longest training video (8 frames): the transformer head learns 40 "
                    "positions, of which those past 8 never train; lower --seq-len"]


def test_sweep_resumed_in_other_arithmetic_is_said(tmp_path, caplog):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 8, "test": 3})
    conf = SweepConfig(base=base(cache, tmp_path / "sw", epochs=2), grids=((("hidden", (8,)),),), min_epochs=1)

    def stop(*_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep(conf, progress=False, on_epoch=stop)
    state = tmp_path / "sw" / "sweep_state.pt"
    st = torch.load(state, weights_only=True)
    assert st["compute"] == "cpu float32"
    torch.save({**st, "compute": "cuda bfloat16"}, state)
    sweep(conf, progress=False)
    assert f"{state} trained its 1 epoch(s) in cuda bfloat16, this run continues in cpu float32" in caplog.text


def test_evaluate_into_the_sweep_folder_writes_only_the_winners_numbers(tmp_path):
    """A sweep's test.json is its winner's; another trial evaluated with --out the sweep folder would
    write a confusion_test.png and per_class_test.csv that contradict it (the sweep writes none,
    so there was nothing to compare with before)."""
    import json

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 12, "test": 6}, noise=2.0)
    sw = tmp_path / "sw"
    sweep(SweepConfig(base=base(cache, sw, epochs=2), grids=((("hidden", (8, 16)),),), min_epochs=2), progress=False)
    test = json.loads((sw / "test.json").read_text())
    loser = next(p for p in (sw / "trials").iterdir() if p.name != test["trial"])
    args = ["evaluate", "--cache", str(cache), "--split", "test", "--out", str(sw)]
    r = CliRunner().invoke(main, ["-q", *args[:1], str(loser / "best.pt"), *args[1:]])
    assert r.exit_code == 1 and f"--out {sw} holds a run whose test results (test.json: " in r.stderr, r.stderr
    assert not (sw / "per_class_test.csv").exists() and not (sw / "confusion_test.png").exists()
    r = CliRunner().invoke(main, ["-q", *args[:1], str(sw / "best.pt"), *args[1:]])
    assert r.exit_code == 0 and (sw / "per_class_test.csv").is_file(), r.stderr


def test_trials_that_differ_only_in_eval_clips_train_once(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 10, "test": 3})
    cfg = SweepConfig(base=base(cache, tmp_path / "sw", epochs=3), grids=((("eval_clips", (1, 3)),),), min_epochs=3)
    trials = expand_grid(cfg)
    assert len(trials) == 2 and trials[0].train_key == trials[1].train_key
    r = sweep(cfg, progress=False)
    a, b = (torch.load(tmp_path / "sw" / "trials" / t / "best.pt", weights_only=True) for t in ("t0", "t1"))
    hist = {x["id"]: x for x in r.leaderboard}
    assert hist["t0"]["epochs"] == hist["t1"]["epochs"] == 3
    if a["epoch"] == b["epoch"]:  # the same training: identical weights at the same epoch
        for k in a["model_state"]:
            assert torch.equal(a["model_state"][k], b["model_state"][k])
    assert a["train_config"]["eval_clips"] == 1 and b["train_config"]["eval_clips"] == 3


def test_sweep_reads_lazily_with_the_same_leaderboard(tmp_path):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 10, "test": 3}, noise=2.0)
    grids = ((("head", ("lstm", "mean")), ("hidden", (8, 16))),)
    boards = {}
    for load in ("memory", "lazy"):
        r = sweep(SweepConfig(base=base(cache, tmp_path / load, epochs=3, load=load), grids=grids, min_epochs=1),
                  progress=False)
        boards[load] = [(x["id"], x["best_val_top1"], x["best_val_loss"], x["status"]) for x in r.leaderboard]
        assert r.test is not None
    assert boards["memory"] == boards["lazy"]


def test_sweep_auto_precision_on_a_gpu_without_bf16_trains_in_fp32(tmp_path, monkeypatch, caplog):
    """`--precision auto` resolves to fp16 on a V100 or T4, which the sweep refused with 'use
    --precision bf16' (emulated there, slower than fp32): auto now trains in fp32 on them."""
    import logging

    import pipeline.sweep as S

    monkeypatch.setattr(S, "training_precision", lambda precision, device: torch.float16)  # such a GPU's auto
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "val": 3, "test": 3})
    with caplog.at_level(logging.INFO):
        r = sweep(SweepConfig(base=base(cache, tmp_path / "sw", epochs=1), grids=((("hidden", (8,)),),),
                              min_epochs=1), progress=False)
    assert "training in fp32: this GPU has no bf16 tensor cores" in caplog.text
    assert r.winner and (tmp_path / "sw" / "best.pt").is_file()
    with pytest.raises(ConfigError, match="the sweep trains in fp32 or bf16"):
        sweep(SweepConfig(base=base(cache, tmp_path / "sw16", epochs=1, precision="fp16"),
                          grids=((("hidden", (8,)),),), min_epochs=1), progress=False)
