"""What a hostile tester found: full disks, interrupts at awkward moments, symlink loops, bad paths.

Each test reproduces one report and checks the one-line error (or the correct result) and that
nothing already written is lost.
"""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, SIZE
from synthetic import separable_cache

import pipeline.run
from cli import main
from pipeline.checkpoint import load_checkpoint
from pipeline.demo import write_video


def cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def cli_subprocess(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def one_line(code: int, err: str, *needles: str) -> str:
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------- full disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (needs root, as CI runs); unmounted afterwards."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        d = tmp_path / f"disk{len(mounted)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounted.append(d)
        return d

    yield make
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _extract_args(root: Path, out: Path, weights: str) -> list[str]:
    return ["extract-features", "--data-dir", str(root), "-o", str(out), "--weights", weights, "--size", str(SIZE),
            "--batch-size", "8", "--workers", "0", "--no-progress"]


@pytest.mark.parametrize("size,where", [("48k", "partial"), ("220k", "cache")])
def test_full_disk_is_one_line_and_a_rerun_resumes(tiny_dataset, tmp_path, weights_file, small_disk, size, where):
    """A real subprocess (h5py used to segfault): one line, exit 1, no .tmp left, finished videos
    kept; after space is freed, the rerun gives the same cache as an uninterrupted run."""
    disk = small_disk(size)
    out = disk / "f.h5"
    r = cli_subprocess(*_extract_args(tiny_dataset, out, str(weights_file)))
    line = one_line(r.returncode, r.stderr, "no space left on device while writing", "free space and rerun")
    assert r.returncode == 1
    assert f"kept in {out}.partial" in line
    assert not list(disk.rglob("*.tmp")), list(disk.rglob("*"))
    kept = list((disk / "f.h5.partial").rglob("*.npz"))
    assert (len(kept) == 6) if where == "cache" else (0 < len(kept) < 6)
    assert not out.exists()

    big = small_disk("4m")  # "free space": move the work to a roomier disk and rerun there
    subprocess.run(["cp", "-a", f"{out}.partial", str(big)], check=True)
    code, out_text, err = cli(*_extract_args(tiny_dataset, big / "f.h5", str(weights_file)))  # in process: no risk
    assert code == 0, err
    assert f"{len(kept)} already cached" in out_text
    ref = tmp_path / "ref.h5"
    assert cli(*_extract_args(tiny_dataset, ref, str(weights_file)))[0] == 0
    with h5py.File(big / "f.h5") as a, h5py.File(ref) as b:
        for split in b:
            assert np.array_equal(a[split]["features"][()], b[split]["features"][()])
            assert list(a[split]["videos"][()]) == list(b[split]["videos"][()])


def test_full_disk_while_saving_recalibrated_backbone(tiny_dataset, small_disk):
    disk = small_disk("1m")  # the backbone file is ~9 MB
    r = cli_subprocess(*_extract_args(tiny_dataset, disk / "f.h5", "none"))
    one_line(r.returncode, r.stderr, "no space left on device while writing", "backbone", "free space and rerun")
    assert not list(disk.iterdir())


def test_full_disk_while_training_keeps_last_good_checkpoint(tmp_path, small_disk):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 8, "test": 3}, dim=512)
    disk = small_disk("2m")  # room for a few checkpoints of a 512-wide LSTM, not for every file of 30 epochs
    code, _, err = cli("train-temporal", "--cache", str(cache), "--out", str(disk / "run"), "--epochs", "30",
                       "--hidden", "96", "--device", "cpu", "--no-progress")
    one_line(code, err, "no space left on device while writing", "free space and then: ", "--resume")  # a plain rerun is refused
    assert not list(disk.rglob("*.tmp"))
    for name in ("best.pt", "last.pt"):
        if (disk / "run" / name).exists():
            torch.load(disk / "run" / name, weights_only=True)  # never torn


# ----------------------------------------------------------------------- train-temporal interrupts


def _train(cache: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return cli("train-temporal", "--cache", str(cache), "--out", str(out), "--epochs", "3", "--hidden", "16",
               "--seq-len", "4", "--device", "cpu", "--no-progress", *extra)


def test_metrics_row_of_last_epoch_is_restored_on_resume(tmp_path):
    """Killed after the final epoch's last.pt (the row not yet written): --resume rewrites it."""
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    assert _train(cache, tmp_path / "run")[0] == 0
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    assert len(rows) == 3
    metrics.write_text("\n".join(rows[:2]) + "\n")  # the state such a kill left
    code, out, err = _train(cache, tmp_path / "run", "--resume")
    assert code == 0, err
    assert metrics.read_text().splitlines() == rows


def test_kill_between_metrics_and_last_never_doubles_a_row(tmp_path, monkeypatch):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    real = pipeline.run.save_checkpoint

    def dies_at_last_of_epoch_2(path, payload, **kw):
        if Path(path).name == "last.pt" and payload["epoch"] == 2:
            raise KeyboardInterrupt
        return real(path, payload, **kw)

    monkeypatch.setattr(pipeline.run, "save_checkpoint", dies_at_last_of_epoch_2)
    code, _, err = _train(cache, tmp_path / "run")
    assert code == 130 and "last.pt holds epoch 1; add --resume" in err, err
    monkeypatch.setattr(pipeline.run, "save_checkpoint", real)
    assert _train(cache, tmp_path / "run", "--resume")[0] == 0
    assert [int(r.split('"epoch": ')[1].split(",")[0]) for r in
            (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_kill_between_last_and_best_is_mended_on_resume(tmp_path, monkeypatch):
    """An epoch saves last.pt, then best.pt. Killed in between, last.pt names as best an epoch
    best.pt does not hold; --resume starts after that epoch, so it writes best.pt from last.pt
    (before 2 Dec best.pt went first, and only a bit-exact replay of the epoch mended it)."""
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    assert _train(cache, tmp_path / "full")[0] == 0
    want = load_checkpoint(tmp_path / "full" / "best.pt")
    real = pipeline.run.save_checkpoint

    def dies_at_best_of(epoch):
        def save(path, payload, **kw):
            if Path(path).name == "best.pt" and payload["epoch"] == epoch:
                raise KeyboardInterrupt
            return real(path, payload, **kw)
        return save

    monkeypatch.setattr(pipeline.run, "save_checkpoint", dies_at_best_of(want["epoch"]))
    code, _, err = _train(cache, tmp_path / "run")
    assert code == 130, err
    assert load_checkpoint(tmp_path / "run" / "last.pt")["best"]["epoch"] == want["epoch"]
    monkeypatch.setattr(pipeline.run, "save_checkpoint", real)
    assert _train(cache, tmp_path / "run", "--resume")[0] == 0
    got = load_checkpoint(tmp_path / "run" / "best.pt")
    assert got["epoch"] == want["epoch"] and "optimizer_state" not in got and got.keys() == want.keys()
    for k in want["model_state"]:
        torch.testing.assert_close(got["model_state"][k], want["model_state"][k], rtol=0, atol=0)
    assert (tmp_path / "run" / "per_class.csv").read_text() == (tmp_path / "full" / "per_class.csv").read_text()


def test_resume_says_when_best_pt_cannot_be_mended(tmp_path, caplog):
    """best.pt gone (deleted by hand) while last.pt names an earlier epoch the best: last.pt does not
    hold that model, so nothing is written, and the resume says so."""
    import logging

    from pipeline.checkpoint import save_checkpoint
    from pipeline.run import RunDir

    from pipeline.config import TemporalConfig
    from pipeline.train import train_temporal

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    train_temporal(TemporalConfig(cache=str(cache), out=str(tmp_path / "run"), hidden=16, epochs=3, seq_len=4,
                                  device="cpu"), progress=False)
    last = load_checkpoint(tmp_path / "run" / "last.pt")
    save_checkpoint(tmp_path / "run" / "last.pt", {**last, "best": {**last["best"], "epoch": 1}})
    (tmp_path / "run" / "best.pt").unlink()
    with caplog.at_level(logging.WARNING), RunDir(tmp_path / "run", resume=True, kind="temporal") as run:
        assert run.load_last("temporal")["epoch"] == 3
    assert not (tmp_path / "run" / "best.pt").exists()
    assert "best.pt is missing or unreadable, but " in caplog.text and "names epoch 1 the best" in caplog.text


def test_interrupt_in_first_epoch_hint_is_true_and_resume_works(tmp_path, monkeypatch):
    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "test": 3})
    ref = _train(cache, tmp_path / "ref")
    assert ref[0] == 0

    import pipeline.train

    real_epoch = pipeline.train.train_one_epoch

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.train, "train_one_epoch", interrupted)
    code, _, err = _train(cache, tmp_path / "a")
    assert code == 130
    assert "no epoch finished yet; rerun with --resume" in err and "last.pt holds" not in err
    monkeypatch.setattr(pipeline.train, "train_one_epoch", real_epoch)
    code, out, err = _train(cache, tmp_path / "a", "--resume")
    assert code == 0, err

    # Interrupted between last.pt and best.pt of epoch 1: a plain rerun is refused, --resume works.
    real_save = pipeline.run.save_checkpoint

    def dies_at_first_best(path, payload, **kw):
        if Path(path).name == "best.pt":
            raise KeyboardInterrupt
        return real_save(path, payload, **kw)

    monkeypatch.setattr(pipeline.run, "save_checkpoint", dies_at_first_best)
    code, _, err = _train(cache, tmp_path / "b")
    assert code == 130 and not (tmp_path / "b" / "best.pt").exists() and (tmp_path / "b" / "last.pt").exists()
    assert "last.pt holds epoch 1; add --resume to continue" in err
    monkeypatch.setattr(pipeline.run, "save_checkpoint", real_save)
    code, _, err = _train(cache, tmp_path / "b")
    one_line(code, err, "already holds a run; use --resume")
    code, out, err = _train(cache, tmp_path / "b", "--resume")
    assert code == 0, err
    # and the result is the uninterrupted run's
    assert out.split("best epoch")[1].splitlines()[0] == ref[1].split("best epoch")[1].splitlines()[0]
    a = torch.load(tmp_path / "ref" / "best.pt", weights_only=True)["model_state"]
    b = torch.load(tmp_path / "b" / "best.pt", weights_only=True)["model_state"]
    for k in a:
        torch.testing.assert_close(a[k], b[k])


# ------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, weights_file):
    from conftest import rand_frames, write_frames

    tmp = tmp_path_factory.mktemp("robust")
    rng = np.random.default_rng(1)
    root = tmp / "ds"
    for split in ("train", "test"):
        for c in ("a", "b"):
            for k in range(3):
                write_frames(root / split / c / f"{c}{k}", rand_frames(rng, 8), ".png")
    assert cli(*_extract_args(root, tmp / "f.h5", str(weights_file)))[0] == 0
    assert cli("train-temporal", "--cache", str(tmp / "f.h5"), "--out", str(tmp / "run"), "--epochs", "1",
               "--hidden", "8", "--seq-len", "4", "--device", "cpu", "--no-progress")[0] == 0
    return tmp / "run" / "best.pt", rng


def test_predict_visits_each_real_folder_once(trained_run, tmp_path):
    ckpt, rng = trained_run
    from conftest import rand_frames

    d = tmp_path / "vids"
    d.mkdir()
    write_video(d / "v.avi", rand_frames(rng, 10), fps=10)
    (d / "again").symlink_to(".")  # a loop
    (tmp_path / "alias").symlink_to(d)  # a second name for the same folder
    code, out, err = cli("predict", str(ckpt), str(d), "--json", "--no-progress", "--device", "cpu")
    assert code == 0, err
    import json

    assert [p["input"] for p in json.loads(out)] == [str(d / "v.avi")]


def test_predict_plot_path_checked_before_the_work(trained_run, tmp_path):
    ckpt, rng = trained_run
    from conftest import rand_frames

    video = tmp_path / "v.avi"
    write_video(video, rand_frames(rng, 12), fps=10)
    plot = tmp_path / "no" / "such" / "dir" / "t.png"
    code, out, err = cli("predict", str(ckpt), str(video), "--window", "4", "--plot", str(plot), "--no-progress",
                         "--device", "cpu")
    assert code == 0, err
    assert str(video) in out and plot.stat().st_size > 0
    (tmp_path / "afile").write_text("x")
    code, out, err = cli("predict", str(ckpt), str(video), "--window", "4", "--plot", str(tmp_path / "afile" / "t.png"),
                         "--no-progress", "--device", "cpu")
    one_line(code, err, "is a file, not a folder")
    assert out == ""  # refused before any work
    code, _, err = cli("predict", str(ckpt), str(video), "--window", "4", "--plot", str(tmp_path / "t.xyz"),
                       "--no-progress")
    assert code == 2 and "unknown image format" in err


# ------------------------------------------------------------------------ files that are not ours


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")  # the pickle payload is the point
def test_non_checkpoints_are_refused_without_unsafe_advice(trained_run, tiny_dataset, tmp_path):
    ckpt, rng = trained_run
    video = tmp_path / "v.avi"
    from conftest import rand_frames

    write_video(video, rand_frames(rng, 6), fps=10)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    files = {"random.pt": os.urandom(4096), "empty.pt": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"a": Payload()}, tmp_path / "payload.pt")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"tool": "x"}, f)
    h5py.File(tmp_path / "cache.h5", "w").close()
    for name in ("random.pt", "empty.pt", "payload.pt", "plain.pkl", "cache.h5"):
        for args in (["predict", str(tmp_path / name), str(video)],
                     ["evaluate", str(tmp_path / name), "--cache", str(tmp_path / "cache.h5")],
                     ["extract-features", "--data-dir", str(tiny_dataset), "--weights", str(tmp_path / name),
                      "-o", str(tmp_path / "o" / "x.h5")]):
            code, _, err = cli(*args)
            line = one_line(code, err, name)
            assert "weights_only" not in line and "can load safely" in line, line
    assert not (tmp_path / "pwned").exists()


def test_output_parent_is_a_file(tiny_dataset, tmp_path, weights_file):
    (tmp_path / "plain").write_text("x")
    code, _, err = cli(*_extract_args(tiny_dataset, tmp_path / "plain" / "f.h5", str(weights_file)))
    one_line(code, err, f"{tmp_path / 'plain'} is a file, not a folder")
    cache = separable_cache(tmp_path / "c.h5", classes=2, per_class={"train": 3, "test": 2})
    code, _, err = cli("train-temporal", "--cache", str(cache), "--out", str(tmp_path / "plain" / "run"))
    one_line(code, err, f"{tmp_path / 'plain'} is a file, not a folder")


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """A power cut must leave the old file or the whole new one: the data is fsynced before the
    rename makes it visible, and the folder after it, so the rename itself is on disk. Parts
    (fsync=False, checked when read) skip both."""
    import pipeline.files as F

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(F.os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                   real_fsync(fd))[1])
    monkeypatch.setattr(F.os, "replace", lambda a, b: (events.append(("replace", str(a))), real_replace(a, b))[1])
    target = tmp_path / "best.pt"
    F.atomic_torch_save(target, {"w": torch.ones(3)})
    assert events == [("fsync", str(target) + ".tmp"), ("replace", str(target) + ".tmp"), ("fsync", str(tmp_path))]
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    events.clear()
    with F.atomic_path(tmp_path / "part.npz", fsync=False) as tmp:
        tmp.write_bytes(b"x")
    assert events == [("replace", str(tmp_path / "part.npz.tmp"))]


def test_an_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path):
    """Replaced by a rename, a file would take the umask's mode: a group-writable file would lock
    out the group, a read-only one become writable. A new file gets the umask's mode."""
    import pipeline.files as F

    old_umask = os.umask(0o022)
    try:
        for mode in (0o664, 0o640, 0o444):
            target = tmp_path / f"{mode:o}.json"
            target.write_text("old")
            target.chmod(mode)
            F.atomic_write_text(target, "new")
            assert (target.read_text(), stat.S_IMODE(target.stat().st_mode)) == ("new", mode)
        F.atomic_write_text(tmp_path / "new.json", "new")
        assert stat.S_IMODE((tmp_path / "new.json").stat().st_mode) == 0o644
    finally:
        os.umask(old_umask)


def _flip_feature_bit(cache: Path, split: str, video: int) -> str:
    """Flip the lowest bit of one feature value of ``video`` in place (a bad sector's damage, still a
    finite number); → the video's relative path."""
    with h5py.File(cache, "r") as f:
        g = f[split]
        ds = g["features"]
        at = ds.id.get_offset() + int(g["offsets"][video]) * ds.shape[1] * ds.dtype.itemsize + 3 * ds.dtype.itemsize
        rel = g["videos"][video].decode()
    with open(cache, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ 1]))
    return rel


def test_a_changed_byte_in_the_features_is_found_by_its_checksum(tiny_dataset, tmp_path, weights_file):
    """HDF5 checks nothing in raw data: one bit flipped in a video's features read as a slightly
    different number, silently, in training, evaluation, and each rerun of the extraction that
    carried the video into its rebuilt cache. Each video's rows now carry a CRC-32: a whole-split
    read and a rebuild say which video is damaged, in one line, and change nothing."""
    from pipeline.cache import FeatureCache
    from pipeline.errors import CacheError

    cache = separable_cache(tmp_path / "c.h5", per_class={"train": 6, "test": 3}, length=(4, 9))
    with FeatureCache(cache) as c:
        clean = c.load_split("train").features.copy()
    rel = _flip_feature_bit(cache, "train", 4)
    with FeatureCache(cache) as c:
        c.load_split("test")  # the other split is intact
        with pytest.raises(CacheError, match="do not match their checksum") as e:
            c.load_split("train")
    assert f"{rel} (split 'train')" in str(e.value) and str(cache) in str(e.value)
    code, _, err = cli("train-temporal", "--cache", str(cache), "--out", str(tmp_path / "run"), "--epochs", "1",
                       "--no-progress")
    one_line(code, err, str(cache), rel, "checksum", "--overwrite")
    # A cache written before the checksums is read as before, unchecked: the flipped bit shows.
    with h5py.File(cache, "r+") as f:
        del f["train"]["checksums"]
    with FeatureCache(cache) as c:
        got = c.load_split("train").features
    assert (got != clean).sum() == 1

    # Extraction: a rerun that rebuilds the cache (a new video) carries the cached videos over.
    root = tiny_dataset
    out = tmp_path / "f.h5"
    assert cli(*_extract_args(root, out, str(weights_file)))[0] == 0
    rel = _flip_feature_bit(out, "train", 1)
    before = out.read_bytes()
    shutil.copytree(root / "train" / "walk" / "w2", root / "train" / "walk" / "w9")
    code, _, err = cli(*_extract_args(root, out, str(weights_file)))
    one_line(code, err, str(out), rel, "checksum", "--overwrite")
    assert out.read_bytes() == before  # nothing replaced; the new video's features are kept in the parts
    assert len(list(Path(f"{out}.partial").glob("*/*.npz"))) == 1
    assert cli(*_extract_args(root, out, str(weights_file)), "--overwrite")[0] == 0
    with FeatureCache(out) as c:
        assert len(c.load_split("train")) == 5


def test_a_cache_damaged_inside_is_one_line_in_every_reader(tmp_path):
    """64 random bytes over a cache's HDF5 metadata (a root group index, an object header, its
    attributes) or its data: whatever breaks is the one CacheError line that names the file, for
    every reader; it was a 40-line h5py traceback from train-temporal, evaluate, extract-features and
    rewrite-cache. The CLI shows it once (train-temporal)."""
    from pipeline.cache import FeatureCache, read_provenance, rewrite_cache
    from pipeline.errors import CacheError

    clean = separable_cache(tmp_path / "clean.h5", per_class={"train": 6, "test": 3}, length=(4, 9))
    size = clean.stat().st_size
    rng = np.random.default_rng(0)
    broken = 0
    for off in sorted({*range(0, min(size, 4096), 128), *rng.integers(0, size - 64, 16).tolist()}):
        path = tmp_path / "damaged.h5"
        data = bytearray(clean.read_bytes())
        data[off:off + 64] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
        path.write_bytes(bytes(data))
        try:
            read_provenance(path)
            with FeatureCache(path) as c:
                for split in c.splits:
                    c.load_split(split)
                    lazy = c.open_lazy(split)
                    lazy.read_rows(np.arange(lazy.shape[0]))
                    lazy.close()
            rewrite_cache(path, tmp_path / "rewritten.h5", force=True)
        except CacheError as e:
            broken += 1
            assert str(path) in str(e) and "\n" not in str(e), (off, str(e))
    assert broken >= 10  # the metadata offsets do break it
    for off in range(0, 4096, 128):
        data = bytearray(clean.read_bytes())
        data[off:off + 64] = bytes(64)
        path.write_bytes(bytes(data))
        r = CliRunner().invoke(main, ["train-temporal", "--cache", str(path), "--out", str(tmp_path / "run"),
                                      "--epochs", "1", "--no-progress"])
        if r.exit_code and "cannot read feature cache" in r.stderr:
            assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
            return
    pytest.fail("no offset in the first 4 KB broke the cache for train-temporal")


def test_an_interrupted_removal_of_the_work_folder_never_lends_its_parts_to_other_settings(tmp_path, monkeypatch,
                                                                                          caplog):
    """`--overwrite` with new weights removes the unfinished run's work folder; Ctrl-C during that
    removal could delete meta.json and leave parts, which the rerun then took as its own: a cache
    recorded as weights B holding weights-A features. The folder is now renamed aside before it is
    deleted, and parts with no meta.json are redone, not adopted."""
    import dataclasses
    import logging

    from synthetic import provenance

    import pipeline.cache as C
    import pipeline.files as F

    def prov(sha: str):
        p = provenance(["a"], 4, dtype="float32")
        return dataclasses.replace(p, weights=dataclasses.replace(p.weights, sha256=sha * 64))

    def rec(i: int, value: float) -> C.VideoRecord:
        return C.VideoRecord(f"a/v{i}", 0, np.full((3, 4), value, np.float32), np.arange(3), 25.0)

    A, B = prov("a"), prov("b")
    out = tmp_path / "f.h5"
    w = C.CacheWriter(out, A)  # run A, interrupted after two videos
    w.add("train", rec(0, 1.0))
    w.add("train", rec(1, 1.0))

    def interrupted(path, *a, **k):  # Ctrl-C in the middle of the deletion: meta.json gone, parts not yet
        (Path(path) / "meta.json").unlink(missing_ok=True)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", interrupted)
        with pytest.raises(KeyboardInterrupt):
            C.CacheWriter(out, B, replace=True)  # run B, --overwrite with other weights
    assert not Path(f"{out}.partial").exists()  # renamed aside whole: nothing there for a rerun to adopt
    C.remove_leftovers(out)  # the rerun, under the cache's lock
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    w = C.CacheWriter(out, B, replace=True)
    assert w.done("train") == {}
    for i in range(3):
        w.add("train", rec(i, 2.0))
    w.finalize({"train": [f"a/v{i}" for i in range(3)]}, {})
    with C.FeatureCache(out) as c:
        s = c.load_split("train")
        assert c.provenance.weights.sha256 == "b" * 64
        assert [float(s.video(i)[0, 0]) for i in range(len(s))] == [2.0, 2.0, 2.0]

    # parts left without meta.json however it went (an older version's removal, a hand) are redone
    w = C.CacheWriter(tmp_path / "g.h5", A)
    w.add("train", rec(0, 1.0))
    (tmp_path / "g.h5.partial" / "train" / "stale.npz.tmp").write_bytes(b"torn")  # a killed part write
    (tmp_path / "g.h5.partial" / "meta.json").unlink()
    C.remove_leftovers(tmp_path / "g.h5")
    assert not list((tmp_path / "g.h5.partial").glob("*/*.tmp"))
    with caplog.at_level(logging.WARNING):
        w = C.CacheWriter(tmp_path / "g.h5", B)
    assert w.done("train") == {}
    assert f"discarding 1 finished video(s) in {tmp_path / 'g.h5.partial'}: its meta.json" in caplog.text
    assert C.read_partial(tmp_path / "g.h5")["provenance"].weights.sha256 == "b" * 64
    # a split's parts are renamed out of the work folder too, never to a name that reads as a split
    w.add("train", rec(0, 2.0))
    monkeypatch.setattr(shutil, "rmtree", lambda *a, **k: None)  # a removal that never gets to delete
    F.remove_tree(tmp_path / "g.h5.partial" / "train", aside=tmp_path / "g.h5.partial")
    assert sorted(p.name for p in (tmp_path / "g.h5.partial").iterdir()) == ["meta.json"]
    assert len(list(tmp_path.glob("g.h5.partial.removing-*"))) == 1


def test_a_work_folder_that_is_a_mount_point_or_a_link_is_emptied_in_place(tmp_path, monkeypatch):
    """A work folder that cannot be renamed aside (a mount point: EBUSY) was deleted in place and
    the failing rmdir of the mount point itself ended in a traceback; a linked one (to a scratch
    disk) was renamed as a link, leaving its contents. Both are now emptied in place."""
    import errno

    import pipeline.files as F

    def filled(folder: Path) -> Path:
        (folder / "train").mkdir(parents=True)
        (folder / "train" / "p.npz").write_bytes(b"x")
        (folder / "meta.json").write_text("{}")
        return folder

    target = filled(tmp_path / "scratch" / "w")
    (tmp_path / "f.h5.partial").symlink_to(target)
    F.remove_tree(tmp_path / "f.h5.partial")
    assert (tmp_path / "f.h5.partial").is_symlink() and not list(target.iterdir())

    mount = filled(tmp_path / "g.h5.partial")

    def busy(a, b):
        raise OSError(errno.EBUSY, "Device or resource busy", str(a))

    monkeypatch.setattr(F.os, "rename", busy)
    F.remove_tree(mount)
    assert mount.is_dir() and not list(mount.iterdir())

    filled(mount)
    (mount / "train" / "p.npz").chmod(0o444)
    real_rmtree = shutil.rmtree

    def refuse(p, *a, **k):
        if not k.get("ignore_errors"):
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real_rmtree(p, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", refuse)
    with pytest.raises(F.NotWritableError, match=rf"cannot delete what {mount} holds \(Permission denied\); "
                                                 "delete it by hand and rerun"):
        F.remove_tree(mount)
    F.remove_tree(mount, strict=False)  # after the cache is written: what cannot go stays
