"""The command line: bad input → one line naming the path, non-zero exit, no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, SIZE, rand_frames, write_frames

from cli import main
from pipeline.files import sha256_file
from pipeline.demo import write_video


def run(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, list(args))
    if r.exception and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.stdout, r.stderr


def extract(root: Path, out: Path, weights: Path, *extra: str) -> tuple[int, str, str]:
    return run("extract-features", "--data-dir", str(root), "--output", str(out), "--weights", str(weights),
               "--size", str(SIZE), "--batch-size", "8", "--workers", "0", "--no-progress", *extra)


def one_error_line(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def failures(out: Path) -> list[dict]:
    with h5py.File(out) as f:
        return json.loads(f.attrs["failures"])


def test_help_lists_commands():
    code, out, _ = run("--help")
    assert code == 0 and "extract-features" in out and "make-demo-data" in out and "demo" in out


def test_float_options_refuse_nan_and_inf(tmp_path):
    """click's FloatRange lets nan and inf by: they reached a traceback (--warmup-epochs), a division
    by zero for every video (--fps inf), NaN in config.json (--label-smoothing), and invalid JSON."""
    cases = [("train-temporal", "--cache", "c.h5", "--out", "r", "--warmup-epochs", "nan"),
             ("train-temporal", "--cache", "c.h5", "--out", "r", "--clip-grad", "inf"),
             ("extract-features", "--data-dir", str(tmp_path), "-o", "f.h5", "--fps", "inf", "--folder-fps", "25"),
             ("predict", "m.pt", str(tmp_path), "--folder-fps", "nan"),
             ("finetune-end-to-end", "--data-dir", str(tmp_path), "--out", "e", "--backbone-lr", "nan"),
             ("sweep", "--cache", "c.h5", "--out", "s", "--lr", "1e-3,nan")]
    for args in cases:
        code, _, err = run(*args)
        assert code == 2 and ("is not a finite number" in err or "(a finite number)" in err), (args, err)
        assert "Traceback" not in err


def test_seeds_outside_32_bits_are_refused(tmp_path):
    """numpy takes no negative seed and the per-epoch torch seeds (seed * 1_000_003 + epoch) overflow
    64 bits from ~9e12: both ended in a traceback with an empty run folder."""
    from pipeline.config import TemporalConfig
    from pipeline.errors import ConfigError

    for seed in ("-1", str(2**32)):
        for args in (("train-temporal", "--cache", "c.h5", "--out", str(tmp_path / "r")),
                     ("sweep", "--cache", "c.h5", "--out", str(tmp_path / "s")),
                     ("finetune-end-to-end", "--data-dir", str(tmp_path), "--out", str(tmp_path / "e")),
                     ("extract-features", "--data-dir", str(tmp_path), "-o", str(tmp_path / "f.h5")),
                     ("make-demo-data", str(tmp_path / "d"))):
            code, _, err = run(*args, "--seed", seed)
            assert code == 2 and "--seed" in err and "0<=x<=4294967295" in err, (args, err)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="seed must be in 0..4294967295, got -1"):
        TemporalConfig(cache="c.h5", out="r", seed=-1)
    assert TemporalConfig(cache="c.h5", out="r", seed=2**32 - 1).seed == 2**32 - 1


def test_options_a_run_does_not_use_are_said(tmp_path):
    """--num-heads for an LSTM, --val-fraction beside --val-split, a warm-up as long as the run:
    each was dropped without a word."""
    from synthetic import separable_cache

    cache = separable_cache(tmp_path / "c.h5", classes=3, per_class={"train": 6, "val": 2, "test": 2})
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "r"), "--epochs", "1",
                                  "--hidden", "8", "--num-heads", "7", "--pool", "mean", "--val-split", "val",
                                  "--val-fraction", "0.5", "--group-pattern", "(x)", "--warmup-epochs", "3",
                                  "--no-progress"])
    assert r.exit_code == 0, r.stderr
    assert "--num-heads: the lstm head does not use it" in r.stderr
    assert "--val-fraction, --group-pattern: are for a validation set carved from train; split 'val' is used " \
        "instead" in r.stderr
    assert "--warmup-epochs 3 is longer than --epochs 1: the learning rate never reaches --lr" in r.stderr
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "t"), "--epochs", "2",
                                  "--hidden", "8", "--head", "mean", "--layers", "2", "--unidirectional",
                                  "--no-progress"])
    assert r.exit_code == 0 and "--hidden, --layers, --unidirectional: the mean head does not use them" in r.stderr, \
        r.stderr
    for cmd in (["train-temporal", "--epochs", "1"], ["sweep", "--epochs", "1", "--lr", "1e-3,2e-3"]):  # val by default
        r = CliRunner().invoke(main, [*cmd, "--cache", str(cache), "--out", str(tmp_path / f"v{cmd[0]}"), "--hidden",
                                      "8", "--val-fraction", "0.3", "--no-progress"])
        assert r.exit_code == 0 and "--val-fraction: is for a validation set carved from train; split 'val' is used " \
            "instead" in r.stderr, r.stderr
    r = CliRunner().invoke(main, ["train-temporal", "--cache", str(cache), "--out", str(tmp_path / "u"), "--epochs", "2",
                                  "--hidden", "8", "--no-progress"])
    assert r.exit_code == 0 and "does not use" not in r.stderr and "--warmup-epochs" not in r.stderr, r.stderr


def test_split_id_without_split_dir_is_refused(tiny_dataset, tmp_path):
    """--split-id picks among --split-dir's files: without it, it picked nothing and was recorded."""
    for args in (["extract-features", "--data-dir", str(tiny_dataset), "-o", str(tmp_path / "x.h5"), "--weights",
                  "none", "--split-id", "3"],
                 ["finetune-end-to-end", "--data-dir", str(tiny_dataset), "--out", str(tmp_path / "r"),
                  "--split-id", "2"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and "Invalid value for --split-id: it picks among the split files of --split-dir, " \
            "which is not given; drop it, or add --split-dir" in r.stderr, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # the dataset alone: no cache, no run folder
    (tmp_path / "trainlist01.txt").write_text("a/v1.avi 1\n")
    r = CliRunner().invoke(main, ["extract-features", "--data-dir", str(tiny_dataset), "-o", str(tmp_path / "x.h5"),
                                  "--split-file", str(tmp_path / "trainlist01.txt"), "--split-id", "1"])
    assert r.exit_code == 2 and "(--split-file gives the split itself)" in r.stderr, r.stderr


def test_output_file_named_as_a_folder_is_refused(tiny_dataset, tmp_path):
    """``Path("feats/")`` is ``feats``: an output file given as a folder (trailing separator) became a
    file of the folder's name. Refused before anything is read or written."""
    d = f"{tmp_path}{os.sep}new{os.sep}"
    for args, example in ((["extract-features", "--data-dir", str(tiny_dataset), "-o", d, "--weights", "none"],
                           "features.h5"),
                          (["rewrite-cache", str(tmp_path / "c.h5"), "--output", d], "features.h5"),
                          (["export", str(tmp_path / "best.pt"), "--out", d], "model.onnx"),
                          (["predict", str(tmp_path / "best.pt"), str(tiny_dataset), "--window", "4", "--plot", d],
                           "timeline.png"),
                          (["demo", "--data-dir", str(tmp_path / "demo"), "--features", d], "demo.h5")):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and f"{d} names a folder; give the file to write in it, e.g. {d}{example}" \
            in r.stderr, (args, r.stderr)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # nothing written: no file "new", no demo data
    for d in (f"{tmp_path}{os.sep}new{os.sep}.", "."):  # also "dir/." (Path makes it "dir") and "."
        r = CliRunner().invoke(main, ["rewrite-cache", str(tmp_path / "c.h5"), "--output", d])
        assert r.exit_code == 2 and f"{d} names a folder; give the file to write in it, e.g. {d}{os.sep}features.h5" \
            in r.stderr, r.stderr


def test_single_process_commands_refuse_torchrun_before_writing(tmp_path):
    """train-temporal, sweep, predict... under torchrun would run once per rank on the same files
    (each rank then met the other's lock and left half a run): refused at once, rank 0 says why."""
    out = tmp_path / "run"
    args = ["train-temporal", "--cache", str(tmp_path / "c.h5"), "--out", str(out)]
    r = CliRunner().invoke(main, args, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
    assert r.exit_code == 1 and r.stderr == (
        "error: train-temporal runs as one process, not under torchrun (2 processes here; only extract-features "
        "and finetune-end-to-end share their work across them): run it as `python cli.py train-temporal ...`\n")
    r = CliRunner().invoke(main, ["sweep", "--cache", "c.h5", "--out", str(out)], env={"WORLD_SIZE": "2", "RANK": "1"})
    assert r.exit_code == 1 and r.stderr == ""
    assert not out.exists()
    r = CliRunner().invoke(main, args, env={"WORLD_SIZE": "1", "RANK": "0"})  # a one-process torchrun is fine
    assert r.exit_code == 1 and "runs as one process" not in r.stderr and "c.h5" in r.stderr


def test_empty_folder_and_broken_frames_are_skipped_and_listed(tiny_dataset, tmp_path, weights_file):
    (tiny_dataset / "train" / "walk" / "empty").mkdir()
    (tiny_dataset / "train" / "walk" / "w1" / "frame_4.png").write_bytes(b"")  # zero bytes
    (tiny_dataset / "train" / "run" / "r1" / "frame_2.PNG").write_bytes(b"\x89PNG garbage")
    cams = tiny_dataset / "train" / "run" / "cams"  # two numbered sequences: no order to read them in
    for name in ("left_{}", "right_{}"):
        write_frames(cams, rand_frames(np.random.default_rng(1), 2), ".png", name=name)
    out = tmp_path / "f.h5"
    code, stdout, err = extract(tiny_dataset, out, weights_file)
    assert code == 0, err
    assert "4 problem(s)" in stdout and "empty" in stdout
    got = {(f["video"], f["skipped"]) for f in failures(out)}
    assert got == {("train/walk/empty", "video"), ("train/walk/w1", "frame"), ("train/run/r1", "frame"),
                   ("train/run/cams", "video")}
    assert "numbered sequences in one folder (left_#, right_#" in err
    with h5py.File(out) as f:
        vids = [v.decode() for v in f["train/videos"][()]]
        offs, idx = f["train/offsets"][()], f["train/frame_indices"][()]
    i = vids.index("train/walk/w1")
    assert list(idx[offs[i]:offs[i + 1]]) == [0, 1, 2] + list(range(4, 12))  # the gap shows
    assert "train/walk/empty" not in vids


def test_strict_turns_skips_into_errors_and_keeps_old_cache(tiny_dataset, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    assert extract(tiny_dataset, out, weights_file, "--splits", "train")[0] == 0
    before = sha256_file(out)
    (tiny_dataset / "test" / "walk" / "w3" / "frame_2.png").write_bytes(b"")
    code, _, err = extract(tiny_dataset, out, weights_file, "--strict")
    one_error_line(code, err, "w3/frame_2.png", "empty file", "--strict")
    assert sha256_file(out) == before


def test_unreadable_video_skipped(tiny_dataset, tmp_path, weights_file):
    (tiny_dataset / "train" / "run" / "bad.avi").write_bytes(np.random.bytes(5000))
    (tiny_dataset / "train" / "run" / "zero.mp4").write_bytes(b"")
    out = tmp_path / "f.h5"
    code, stdout, err = extract(tiny_dataset, out, weights_file)
    assert code == 0, err
    assert {f["video"] for f in failures(out)} == {"train/run/bad.avi", "train/run/zero.mp4"}
    assert "bad.avi" in err and "zero.mp4" in err  # warned while running
    code, _, err = extract(tiny_dataset, tmp_path / "g.h5", weights_file, "--strict")
    one_error_line(code, err, "bad.avi")
    assert not (tmp_path / "g.h5").exists()


def test_one_frame_video_and_class_without_videos(tiny_dataset, tmp_path, weights_file):
    rng = np.random.default_rng(0)
    write_frames(tiny_dataset / "train" / "walk" / "single", rand_frames(rng, 1))
    write_video(tiny_dataset / "train" / "run" / "one.mkv", rand_frames(rng, 1))
    (tiny_dataset / "train" / "sit").mkdir()
    out = tmp_path / "f.h5"
    code, _, err = extract(tiny_dataset, out, weights_file)
    assert code == 0, err
    assert "class folder" in err and "sit has no videos" in err
    with h5py.File(out) as f:
        assert json.loads(f.attrs["classes"]) == ["jump", "run", "sit", "walk"]
        vids = [v.decode() for v in f["train/videos"][()]]
        lengths = np.diff(f["train/offsets"][()])
    assert lengths[vids.index("train/walk/single")] == 1 and lengths[vids.index("train/run/one.mkv")] == 1


@pytest.mark.parametrize("case, needles", [
    ("missing_dir", ["dataset folder not found", "nope"]),
    ("file_not_dir", ["dataset path is a file"]),
    ("file_at_split_level", ["found a file", "readme.txt"]),
    ("file_at_class_level", ["found a file", "labels.csv"]),
    ("missing_split", ["split 'val' not found", "found: test, train"]),
    ("duplicate_name", ["'w1' is in two classes", "run/w1"]),
    ("no_frames_at_all", ["no decodable frames in any of the 2 videos"]),
    ("output_is_dir", ["is a folder"]),
    ("weights_missing", ["weights file not found", "missing.pt"]),
    ("weights_garbage", ["garbage.pt is not a weights file this tool can load safely"]),
    ("fps_without_folder_fps", ["--folder-fps"]),
])
def test_bad_input_one_line(tiny_dataset, tmp_path, weights_file, case, needles):
    root, out, weights, extra = tiny_dataset, tmp_path / "f.h5", weights_file, []
    if case == "missing_dir":
        root = tmp_path / "nope"
    elif case == "file_not_dir":
        root = tmp_path / "file"
        root.write_text("x")
    elif case == "file_at_split_level":
        (tiny_dataset / "readme.txt").write_text("x")
    elif case == "file_at_class_level":
        (tiny_dataset / "train" / "labels.csv").write_text("x")
    elif case == "missing_split":
        extra = ["--splits", "train,val"]
    elif case == "duplicate_name":  # the same video copied into a second class
        shutil.copytree(tiny_dataset / "train" / "walk" / "w1", tiny_dataset / "train" / "run" / "w1")
    elif case == "no_frames_at_all":
        root = tmp_path / "empty_ds"
        (root / "train" / "a" / "v1").mkdir(parents=True)
        (root / "train" / "b" / "v2").mkdir(parents=True)
    elif case == "output_is_dir":
        out = tmp_path
    elif case == "weights_missing":
        weights = tmp_path / "missing.pt"
    elif case == "weights_garbage":
        weights = tmp_path / "garbage.pt"
        weights.write_bytes(b"not a checkpoint")
    elif case == "fps_without_folder_fps":
        extra = ["--fps", "5"]
    code, _, err = extract(root, out, weights, *extra)
    one_error_line(code, err, *needles)
    if case != "output_is_dir":
        assert not out.exists() and not Path(f"{out}.partial").exists() or case == "no_frames_at_all"
    if case == "no_frames_at_all":
        assert not out.exists()


def test_size_mismatch_refused_keeps_cache(tiny_dataset, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    assert extract(tiny_dataset, out, weights_file)[0] == 0
    before = sha256_file(out)
    r = CliRunner().invoke(main, ["extract-features", "--data-dir", str(tiny_dataset), "--output", str(out),
                                  "--weights", str(weights_file), "--size", "48", "--workers", "0", "--no-progress"])
    one_error_line(r.exit_code, r.stderr, "FrameSpec", "--overwrite")
    assert sha256_file(out) == before


def test_usage_errors_are_click_errors(tiny_dataset):
    for opt in (["--stride", "0"], ["--max-frames", "0"], ["--resize", "stretch"]):
        r = CliRunner().invoke(main, ["extract-features", "--data-dir", str(tiny_dataset), *opt])
        assert r.exit_code == 2 and "Invalid value" in r.stderr and "Traceback" not in r.stderr


def test_real_subprocess_make_demo_and_extract(tmp_path, weights_file):
    """`python cli.py` as a user runs it: make demo data, extract, read the cache."""
    data, out = tmp_path / "demo", tmp_path / "demo.h5"
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "make-demo-data", str(data), "--train", "1",
                        "--test", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "8 classes" in r.stdout
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "extract-features", "--data-dir", str(data),
                        "--output", str(out), "--weights", str(weights_file), "--size", str(SIZE),
                        "--max-frames", "4", "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: test 8 videos, train 8 videos" in r.stdout
    with h5py.File(out) as f:
        assert f["train/features"].shape == (32, 1280)
        kinds = {Path(v.decode()).suffix for v in f["train/videos"][()]}
    assert kinds == {"", ".mp4"}  # frame folders and (with one video per class) an h264 file


def test_stage_two_commands_never_load_torchvision(tmp_path):
    """Importing torchvision takes ~2 s here. train-temporal, evaluate and sweep work on cached
    features and never need it, so they start that much sooner: run in one fresh process, as a
    user runs them one after another, they leave it unloaded."""
    from synthetic import separable_cache

    cache = separable_cache(tmp_path / "c.h5", classes=2, per_class={"train": 6, "test": 2})
    script = f"""
import sys
from cli import main
for args in (["train-temporal", "--cache", {str(cache)!r}, "--out", {str(tmp_path / "run")!r}, "--epochs", "1",
              "--hidden", "8", "--val-split", "test", "--no-progress"],
             ["evaluate", {str(tmp_path / "run" / "best.pt")!r}, "--cache", {str(cache)!r}],
             ["sweep", "--cache", {str(cache)!r}, "--out", {str(tmp_path / "sweep")!r}, "--epochs", "1",
              "--hidden", "8", "--val-split", "test", "--no-progress"]):
    try:
        main(args)
    except SystemExit as e:
        assert not e.code, (args[0], e.code)
print(sorted(m for m in sys.modules if m.split(".")[0] == "torchvision"))
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout[-300:]


def test_overwrite_keeps_old_cache_until_the_new_one_is_complete(tiny_dataset, tmp_path, weights_file):
    out = tmp_path / "f.h5"
    assert extract(tiny_dataset, out, weights_file)[0] == 0
    before = sha256_file(out)
    (tmp_path / "garbage.pt").write_bytes(b"junk")
    code, _, err = extract(tiny_dataset, out, tmp_path / "garbage.pt", "--overwrite")
    one_error_line(code, err, "is not a weights file this tool can load safely")
    empty = tmp_path / "empty_ds"
    (empty / "train" / "a" / "v").mkdir(parents=True)
    code, _, err = extract(empty, out, weights_file, "--overwrite")
    one_error_line(code, err, "no decodable frames")
    assert sha256_file(out) == before  # failed replacements left the good cache alone
    code, _, err = extract(tiny_dataset, out, weights_file, "--overwrite", "--max-frames", "2")
    assert code == 0, err
    with h5py.File(out) as f:
        assert f["train/features"].shape[0] == 8  # replaced: 4 videos x 2 frames


def test_odd_names_and_animated_frames_are_bounded(tiny_dataset, tmp_path, weights_file):
    import os

    from PIL import Image

    walk = tiny_dataset / "train" / "walk"
    os.rename(bytes(walk / "w2"), bytes(walk) + b"/vid\xe9o")  # not valid UTF-8
    anim = walk / "w1" / "frame_13.jpg"
    frames = [Image.fromarray(f) for f in rand_frames(np.random.default_rng(0), 3)]
    frames[0].save(anim, format="GIF", save_all=True, append_images=frames[1:])  # a GIF under a .jpg name
    out = tmp_path / "f.h5"
    code, stdout, err = extract(tiny_dataset, out, weights_file)
    assert code == 0 and "Traceback" not in err, err
    assert "not valid UTF-8; rename it" in err
    assert "an animation (3 frames)" in stdout
    with h5py.File(out) as f:
        assert "train/walk/w1" in [v.decode() for v in f["train/videos"][()]]


def test_repaired_frame_is_picked_up_on_rerun(tiny_dataset, tmp_path, weights_file):
    frame = tiny_dataset / "train" / "walk" / "w1" / "frame_4.png"
    good = frame.read_bytes()
    frame.write_bytes(b"")
    out = tmp_path / "f.h5"
    assert extract(tiny_dataset, out, weights_file)[0] == 0
    assert len(failures(out)) == 1
    frame.write_bytes(good)
    code, stdout, _ = extract(tiny_dataset, out, weights_file)
    assert code == 0 and "this run: 1 videos" in stdout
    assert failures(out) == []
    with h5py.File(out) as f:
        vids = [v.decode() for v in f["train/videos"][()]]
        i = vids.index("train/walk/w1")
        assert list(f["train/frame_indices"][f["train/offsets"][i]:f["train/offsets"][i + 1]]) == list(range(12))


def test_output_inside_dataset_and_empty_split(tiny_dataset, tmp_path, weights_file):
    code, _, err = extract(tiny_dataset, tiny_dataset / "feat.h5", weights_file)
    one_error_line(code, err, "inside the dataset folder")
    (tiny_dataset / "val").mkdir()
    code, _, err = extract(tiny_dataset, tmp_path / "f.h5", weights_file)
    assert code == 0 and "split folder" in err and "val has no videos" in err


def _bad(path: Path, name: bytes) -> bytes:
    """``path/name`` as bytes: a name that is not valid UTF-8 (as unpacked from a Latin-1 archive)."""
    return os.fsencode(path) + b"/" + name


def test_class_and_split_folders_with_non_utf8_names_are_ignored(tiny_dataset, tmp_path, weights_file):
    rng = np.random.default_rng(0)
    write_frames(tmp_path / "v", rand_frames(rng, 3))
    os.mkdir(_bad(tiny_dataset / "train", b"cl\xe9ss"))
    os.rename(tmp_path / "v", _bad(tiny_dataset / "train", b"cl\xe9ss/v"))
    os.makedirs(_bad(tiny_dataset, b"te\xe9st/walk/w9"))
    write_frames(tmp_path / "w", rand_frames(rng, 3))
    for f in (tmp_path / "w").iterdir():
        os.rename(f, _bad(tiny_dataset, b"te\xe9st/walk/w9/" + f.name.encode()))
    out = tmp_path / "f.h5"
    code, _, err = extract(tiny_dataset, out, weights_file)
    assert code == 0 and "Traceback" not in err, err
    assert "train/cl\\xe9ss': its name is not valid UTF-8" in err and "te\\xe9st': its name" in err
    assert not Path(f"{out}.tmp").exists() and not Path(f"{out}.partial").exists()
    with h5py.File(out) as f:
        assert json.loads(f.attrs["classes"]) == ["jump", "run", "walk"] and sorted(f) == ["test", "train"]


def test_split_files_naming_a_non_utf8_class_are_ignored(tmp_path, weights_file):
    rng = np.random.default_rng(0)
    root, splits = tmp_path / "hmdb", tmp_path / "splits"
    for cls in ("jump", "walk"):
        for k in range(2):
            write_frames(root / cls / f"{cls}{k}", rand_frames(rng, 3))
        (splits / f"{cls}_test_split1.txt").parent.mkdir(exist_ok=True)
        (splits / f"{cls}_test_split1.txt").write_text(f"{cls}0.avi 1\n{cls}1.avi 2\n")
    os.rename(root / "walk", _bad(root, b"w\xe4lk"))
    os.rename(splits / "walk_test_split1.txt", _bad(splits, b"w\xe4lk_test_split1.txt"))
    out = tmp_path / "f.h5"
    code, _, err = extract(root, out, weights_file, "--split-dir", str(splits))
    assert code == 0 and "Traceback" not in err, err
    assert "w\\xe4lk_test_split1.txt': its name is not valid UTF-8" in err
    with h5py.File(out) as f:
        assert json.loads(f.attrs["classes"]) == ["jump"]
        assert [v.decode() for v in f["train/videos"][()]] == ["jump/jump0"]


def test_videos_the_split_files_list_but_the_disk_lacks_are_in_the_failures(tmp_path, weights_file):
    """A partial download: the official split names videos that are not there. Besides the warnings
    while indexing, they are in the summary and the cache's failures, so the split's difference from
    the official one is on record. The summary lists 20 problems and counts the rest."""
    rng = np.random.default_rng(0)
    root, splits = tmp_path / "hmdb", tmp_path / "splits"
    splits.mkdir()
    for cls in ("jump", "walk"):
        for k in range(2):
            write_frames(root / cls / f"{cls}{k}", rand_frames(rng, 3))
        listed = [f"{cls}{k}.avi {1 if k % 2 == 0 else 2}" for k in range(2 + 12)]  # 12 a class not on disk
        (splits / f"{cls}_test_split1.txt").write_text("\n".join(listed) + "\n")
    out = tmp_path / "f.h5"
    code, stdout, err = extract(root, out, weights_file, "--split-dir", str(splits))
    assert code == 0, err
    assert "24 problem(s)" in stdout and "... and 4 more (4 missing)" in stdout
    assert f"skipped missing: {splits / 'jump_test_split1.txt'}:3 lists {root / 'jump' / 'jump2.avi'}, which is not " \
           "on disk" in stdout
    got = failures(out)
    assert len(got) == 24 and {f["skipped"] for f in got} == {"missing"}
    assert {(f["split"], f["video"]) for f in got if f["video"].startswith("walk/")} == \
        {("train" if k % 2 == 0 else "test", f"walk/walk{k}.avi") for k in range(2, 14)}
    code, stdout, _ = extract(root, out, weights_file, "--split-dir", str(splits))  # nothing to do: unchanged
    assert code == 0 and "0 videos" in stdout and len(failures(out)) == 24


def _without_dac(args: list[str], probe: Path) -> list[str] | None:
    """A command line that runs ``args`` unable to read chmod-000 folders such as ``probe``: through
    capsh without the DAC capabilities when root, as is otherwise; None if neither can."""
    import shlex

    cmd = args
    if os.geteuid() == 0:
        if not Path("/usr/sbin/capsh").exists():
            return None
        cmd = ["/usr/sbin/capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c", shlex.join(args)]
    test = (cmd[:-1] + [shlex.join(["ls", str(probe)])]) if os.geteuid() == 0 else ["ls", str(probe)]
    return cmd if subprocess.run(test, capture_output=True, check=False).returncode != 0 else None


@pytest.mark.parametrize("layout", ["split_tree", "split_files"])
def test_unreadable_split_and_class_folders_are_skipped(tiny_dataset, tmp_path, weights_file, layout):
    extra: list[str] = []
    if layout == "split_tree":
        locked = [tiny_dataset / "train" / "run"]
        write_frames(tiny_dataset / "val" / "walk" / "w8", rand_frames(np.random.default_rng(0), 2))
        locked.append(tiny_dataset / "val")
    else:
        (tmp_path / "trainlist01.txt").write_text("run/r1.avi 1\nwalk/w1.avi 1\njump/j1.avi 1\n")
        for split in ("train", "test"):
            for d in (tiny_dataset / split).iterdir():
                for v in d.iterdir():
                    (tiny_dataset / d.name).mkdir(exist_ok=True)
                    os.rename(v, tiny_dataset / d.name / v.name)
            shutil.rmtree(tiny_dataset / split)
        locked = [tiny_dataset / "run"]
        extra = ["--split-file", str(tmp_path / "trainlist01.txt")]
    def extract_locked(out: Path) -> subprocess.CompletedProcess:
        args = [sys.executable, str(REPO / "cli.py"), "extract-features", "--data-dir", str(tiny_dataset), "--output",
                str(out), "--weights", str(weights_file), "--size", str(SIZE), "--workers", "0", "--no-progress",
                *extra]
        for d in locked:
            d.chmod(0)
        try:
            cmd = _without_dac(args, locked[0])
            if cmd is None:
                pytest.skip("cannot make a folder unreadable here (root without capsh)")
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, check=False)
        finally:
            for d in locked:
                d.chmod(0o755)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        for d in locked:
            assert f"cannot read {'split' if d.name == 'val' else 'class'} folder {d}" in r.stderr
        return r

    out = tmp_path / "f.h5"
    extract_locked(out)
    with h5py.File(out) as f:
        assert json.loads(f.attrs["classes"]) == ["jump", "run", "walk"]  # labels do not move
        videos = [v.decode() for v in f["train/videos"][()]]
        assert not [v for v in videos if "run" in v] and videos
        assert "val" not in f

    # A folder that cannot be read this time keeps what an earlier run cached of it, in its place.
    full = tmp_path / "full.h5"
    code, _, err = extract(tiny_dataset, full, weights_file, *extra)
    assert code == 0, err
    with h5py.File(full) as f:
        before = {s: (list(f[s]["videos"][()]), f[s]["features"][()]) for s in f}
    r = extract_locked(full)
    run_dir = locked[0].relative_to(tiny_dataset).as_posix()
    with h5py.File(full) as f:
        assert set(f) == set(before)
        for s, (videos, feats) in before.items():
            assert list(f[s]["videos"][()]) == videos and np.array_equal(f[s]["features"][()], feats), s
        kept = sum(v.decode().startswith(run_dir + "/") for v in f["train/videos"][()])
    assert kept > 0 and f"kept the {kept} cached video(s) under {run_dir}" in r.stderr, r.stderr


def test_ignored_names_are_listed_warned_once_and_not_retried(tiny_dataset, tmp_path):
    """Every name left out (split, class, video folder, video file, frame) is in the failure list and
    the summary, warned about once (calibration decodes the frames too), and a rerun does not redo
    the video whose frame was left out: the name is as wrong as before."""
    rng = np.random.default_rng(0)
    walk = tiny_dataset / "train" / "walk"
    os.rename(walk / "w2", _bad(walk, b"vid\xe9o"))
    os.rename(walk / "w1" / "frame_12.png", _bad(walk / "w1", b"fr\xe9me_13.png"))
    write_video(tmp_path / "c.mkv", rand_frames(rng, 3))
    os.rename(tmp_path / "c.mkv", _bad(tiny_dataset / "train" / "run", b"cl\xe9p.mkv"))
    write_frames(tmp_path / "v", rand_frames(rng, 2))
    os.makedirs(_bad(tiny_dataset / "train", b"cl\xe9ss"))
    os.rename(tmp_path / "v", _bad(tiny_dataset / "train", b"cl\xe9ss/v"))
    os.makedirs(_bad(tiny_dataset, b"te\xe9st/walk"))
    out = tmp_path / "f.h5"
    args = ["extract-features", "--data-dir", str(tiny_dataset), "--output", str(out), "--weights", "none",
            "--size", str(SIZE), "--calibration-frames", "16", "--workers", "0", "--no-progress"]
    code, stdout, err = run(*args)
    assert code == 0, err
    names = ["te\\xe9st", "train/cl\\xe9ss", "train/walk/vid\\xe9o", "train/run/cl\\xe9p.mkv",
             "train/walk/w1/fr\\xe9me_13.png"]
    for name in names:
        assert err.count(f"{name}': its name is not valid UTF-8") == 1, (name, err)
    assert "5 problem(s)" in stdout and all(f"skipped name: ignored '{tiny_dataset}/{n}'" in stdout for n in names)
    got = {(f["split"], f["video"], f["skipped"]) for f in failures(out)}
    assert got == {(None, "te\\xe9st", "name"), ("train", "train/cl\\xe9ss", "name"),
                   ("train", "train/walk/vid\\xe9o", "name"), ("train", "train/run/cl\\xe9p.mkv", "name"),
                   ("train", "train/walk/w1", "name")}
    before = sha256_file(out)
    code, stdout, err = run(*args)
    assert code == 0 and "this run: 0 videos" in stdout and "5 problem(s)" in stdout, stdout + err
    assert sha256_file(out) == before  # nothing new: the cache is left as it was, and says so
    assert stdout.startswith(f"up to date, left as it was: {out}: ") and "wrote" not in stdout
    assert f"backbone: {tmp_path}/f.backbone-" in stdout and "saved beside the cache; later stages use it" in stdout


def test_truncated_video_is_kept_listed_retried_and_strict_refuses(tiny_dataset, tmp_path, weights_file):
    import re

    from conftest import cut_file, write_faststart_mp4

    video = tiny_dataset / "train" / "run" / "cut.mp4"
    write_faststart_mp4(video, rand_frames(np.random.default_rng(0), 120))
    cut_file(video, video.stat().st_size // 2)
    out = tmp_path / "f.h5"
    code, stdout, err = extract(tiny_dataset, out, weights_file)
    assert code == 0, err
    (got,) = failures(out)
    assert (got["video"], got["skipped"]) == ("train/run/cut.mp4", "frames")
    m = re.search(r"truncated: decoded (\d+) of 120 frames the header declares", got["reason"])
    assert m and f"skipped frames: {got['reason']}" in stdout and "cut.mp4: truncated" in err
    with h5py.File(out) as f:
        vids = [v.decode() for v in f["train/videos"][()]]
        lengths = np.diff(f["train/offsets"][()])
    assert lengths[vids.index("train/run/cut.mp4")] == int(m[1]) < 120  # kept, with the frames it has
    code, stdout, _ = extract(tiny_dataset, out, weights_file)
    assert code == 0 and "this run: 1 videos" in stdout and len(failures(out)) == 1  # retried, like a broken frame
    code, _, err = extract(tiny_dataset, tmp_path / "g.h5", weights_file, "--strict")
    one_error_line(code, err, "cut.mp4: truncated: decoded", "--strict")
    assert not (tmp_path / "g.h5").exists()


def test_backbone_by_name_and_list_backbones(tiny_dataset, tmp_path):
    """--backbone reaches the cache through the CLI; list-backbones shows each model's dimension,
    its default weights' input and its tags, default first."""
    out = tmp_path / "r18.h5"
    r = CliRunner().invoke(main, ["extract-features", "--data-dir", str(tiny_dataset), "--output", str(out),
                                  "--backbone", "resnet18", "--weights", "none", "--size", str(SIZE),
                                  "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.output
    with h5py.File(out) as f:
        prov = json.loads(f.attrs["provenance"])
        assert (prov["backbone"], prov["feature_dim"], f["train/features"].shape[1]) == ("resnet18", 512, 512)
    r = CliRunner().invoke(main, ["list-backbones"])
    assert r.exit_code == 0, r.output
    rows = {line.split()[0]: line.split(None, 4) for line in r.output.splitlines()[1:]}
    assert rows["resnet50"][1:] == ["2048", "232->224", "bilinear", "IMAGENET1K_V2, IMAGENET1K_V1"]
    assert rows["efficientnet_b0"][1:] == ["1280", "256->224", "bicubic", "IMAGENET1K_V1"]
    assert rows["mobilenet_v3_small"][1] == "1024" and len(rows) > 50
    r = CliRunner().invoke(main, ["list-backbones", "--blocks", "resnet18"])
    assert r.exit_code == 0 and r.output.startswith("resnet18: 5 blocks, 512-d features")
    assert [line.split()[1] for line in r.output.splitlines()[1:]] == ["conv1,", "layer1", "layer2", "layer3", "layer4"]
    for args, msg in ((["--blocks", ""], "--blocks: is empty"), (["--timm", " "], "--timm: is empty"),
                      (["--blocks", "resnet18", "--timm", "vit*"], "--blocks and --timm list different things")):
        r = CliRunner().invoke(main, ["list-backbones", *args])  # not silently the full list
        assert r.exit_code == 2 and msg in r.stderr, (args, r.stderr)


def test_demo_runs_end_to_end(tmp_path):
    """`make demo`'s job, shortened to 2 epochs: every step runs, twice (the rerun replaces its own
    run), and ends with its summary. Nothing else in the suite runs the demo whole."""
    args = ["demo", "--data-dir", str(tmp_path / "data"), "--features", str(tmp_path / "f.h5"),
            "--out", str(tmp_path / "run"), "--epochs", "2"]
    for _ in range(2):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.stderr
        assert all(f"[{i}/5]" in r.output for i in range(1, 6)) and "correct" in r.output
        assert "done in" in r.output and "(model picked on validation, not on test)" in r.output
    assert {"best.pt", "test.json", "confusion_test.png", "per_class_test.csv"} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_demo_replaces_only_what_it_wrote(tmp_path):
    """The demo rewrites its own dataset and run, never a folder of the user's given by mistake."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("keep")
    args = ["demo", "--features", str(tmp_path / "f.h5"), "--epochs", "1"]
    r = CliRunner().invoke(main, [*args, "--data-dir", str(mine), "--out", str(tmp_path / "run")])
    assert r.exit_code == 1 and "--data-dir" in r.stderr and "holds no demo data" in r.stderr
    assert [p.name for p in mine.iterdir()] == ["keep.txt"] and (mine / "keep.txt").read_text() == "keep"
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"a run of the user's")
    (run / "config.json").write_text('{"train": {"cache": "features/mine.h5"}}')
    r = CliRunner().invoke(main, [*args, "--data-dir", str(tmp_path / "new"), "--out", str(run)])
    assert r.exit_code == 1 and "holds a run that is not the demo's (on features/mine.h5)" in r.stderr
    assert not (tmp_path / "new").exists() and (run / "best.pt").read_bytes() == b"a run of the user's"
    (tmp_path / "notes.txt").write_text("x")
    for root, msg in ((tmp_path / "notes.txt", "is a file, not a folder"), (tmp_path / "notes.txt" / "sub", "is a file"),
                      (Path("/proc/demo"), "cannot write to dataset folder /proc")):
        r = CliRunner().invoke(main, ["make-demo-data", str(root), "--train", "1", "--test", "1"])
        assert r.exit_code == 1 and msg in r.stderr and "Traceback" not in r.stderr, (root, r.stderr)
    assert (tmp_path / "notes.txt").read_text() == "x"


def test_interrupt_and_disk_full_hints_are_true_when_printed(tmp_path, monkeypatch, tiny_dataset, weights_file):
    """The hint after Ctrl-C (or a full disk) says what a rerun will do, as things are then."""
    import pipeline.extract
    import pipeline.sweep
    import pipeline.train
    from pipeline.files import disk_full

    out = tmp_path / "f.h5"
    parts = Path(f"{out}.partial") / "train"

    def interrupted(*_, **__):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.extract, "extract_features", interrupted)
    code, _, err = extract(tiny_dataset, out, weights_file, "--overwrite")
    assert code == 130 and err.strip() == "interrupted: no video was finished yet; rerun the same command to start again"
    parts.mkdir(parents=True)
    (parts / "a.npz").write_bytes(b"")
    code, _, err = extract(tiny_dataset, out, weights_file)
    assert err.strip() == (f"interrupted: 1 finished video(s) are kept in {out}.partial; rerun the same command "
                           "to resume")

    sweep_out = tmp_path / "sweep"
    monkeypatch.setattr(pipeline.sweep, "sweep", interrupted)
    code, _, err = run("sweep", "--cache", str(out), "--out", str(sweep_out), "--overwrite")
    assert code == 130 and err.strip().endswith("no progress of this sweep was saved yet; rerun the same command to start over")

    def sweep_one_epoch(cfg, **_):
        sweep_out.mkdir(exist_ok=True)
        (sweep_out / "sweep_state.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.sweep, "sweep", sweep_one_epoch)
    code, _, err = run("sweep", "--cache", str(out), "--out", str(sweep_out), "--overwrite")
    assert err.strip().endswith(f"the sweep's progress is kept in {sweep_out / 'sweep_state.pt'}; rerun the command "
                                "without --overwrite to resume it")

    def full_after_first_epoch(cfg, on_start, **_):  # as RunDir reports it after epoch 1
        from pipeline.run import RunDir

        run_dir = RunDir(cfg.out)
        on_start(run_dir)
        run_dir.close()
        (Path(cfg.out) / "last.pt").write_bytes(b"")
        raise disk_full(Path(cfg.out) / "last.pt")

    monkeypatch.setattr(pipeline.train, "train_temporal", full_after_first_epoch)
    run_out = tmp_path / "run"
    code, _, err = run("train-temporal", "--cache", str(out), "--out", str(run_out))
    one_error_line(code, err, f"no space left on device while writing {run_out / 'last.pt'}; free space and then: "
                              "no epoch finished yet; rerun with --resume to start again in")


def test_a_refused_command_leaves_a_new_folder_another_run_is_using(tmp_path, monkeypatch):
    """A command refused before it wrote removes the --out it would have made, unless another
    run made that folder meanwhile and holds it."""
    import contextlib

    import pipeline.train
    from pipeline.errors import ConfigError
    from pipeline.files import exclusive

    out = tmp_path / "new" / "run"
    held = contextlib.ExitStack()

    def other_run_starts_then_refused(cfg, **_):
        out.mkdir(parents=True)
        held.enter_context(exclusive(out, "--out"))  # as another process would
        raise ConfigError("refused")

    monkeypatch.setattr(pipeline.train, "train_temporal", other_run_starts_then_refused)
    with held:
        code, _, err = run("train-temporal", "--cache", str(tmp_path / "c.h5"), "--out", str(out))
        assert code == 1 and err.strip() == "error: refused" and out.is_dir()
    out.rmdir()
    out.parent.rmdir()
    monkeypatch.setattr(pipeline.train, "train_temporal", lambda cfg, **_: (out.mkdir(parents=True),
                                                                              (_ for _ in ()).throw(ConfigError("x"))))
    code, _, _ = run("train-temporal", "--cache", str(tmp_path / "c.h5"), "--out", str(out))
    assert code == 1 and not (tmp_path / "new").exists()  # nobody else there: removed, with the parent it made


def test_paths_that_are_not_files_are_refused_not_read_or_replaced(tiny_dataset, tmp_path, weights_file):
    """A FIFO or a device as --output or --cache: one line, and the node stays what it was. Reading the
    FIFO blocked extract-features forever; --overwrite replaced a device (as root: /dev/null) with a cache."""
    import stat

    fifo = tmp_path / "ff"
    os.mkfifo(fifo)
    nodes = [fifo]
    with contextlib.suppress(OSError):  # a device node needs root (CAP_MKNOD)
        os.mknod(tmp_path / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        nodes.append(tmp_path / "null")
    base = [sys.executable, str(REPO / "cli.py"), "extract-features", "--data-dir", str(tiny_dataset), "--weights",
            str(weights_file), "--size", str(SIZE), "--workers", "0", "--no-progress"]
    runs = {(node, i): subprocess.Popen([*base, "--output", str(node), *extra], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)  # side by side: each is mostly start-up
            for node in nodes for i, extra in enumerate(([], ["--overwrite"]))}
    try:
        for (node, _), proc in runs.items():
            err = proc.communicate(timeout=120)[1]
            what = "a FIFO" if node == fifo else "a device"
            one_error_line(proc.returncode, err, f"--output {node} is {what}, not a file")
    finally:
        for proc in runs.values():
            proc.kill()
    for node in nodes:
        assert stat.S_ISFIFO(node.stat().st_mode) if node == fifo else stat.S_ISCHR(node.stat().st_mode)
        assert not Path(f"{node}.lock").exists() and not Path(f"{node}.partial").exists()
    code, _, err = run("train-temporal", "--cache", str(fifo), "--out", str(tmp_path / "run"))
    one_error_line(code, err, f"{fifo} is a FIFO, not a feature cache file")
    from pipeline.files import NotWritableError, atomic_write_bytes

    with pytest.raises(NotWritableError, match="is not a regular file"):  # every atomic write: export, plots, ...
        atomic_write_bytes(fifo, b"x")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
