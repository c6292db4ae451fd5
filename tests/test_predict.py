"""predict: same answer as evaluate on cached features, JSON schema, timelines, flat memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, SIZE, rand_frames, write_frames
from PIL import Image

from cli import main
from pipeline.config import DatasetSpec, ExtractConfig, FrameSpec, TemporalConfig
from pipeline.demo import write_video
from pipeline.errors import WeightsError
from pipeline.extract import extract_features
from pipeline.predict import Predictor, window_bounds
from pipeline.train import evaluate_checkpoint, train_temporal


@pytest.fixture(scope="module")
def trained(tmp_path_factory, weights_file):
    """A tiny dataset, its cache, and a stage-two checkpoint trained on it."""
    tmp = tmp_path_factory.mktemp("trained")
    rng = np.random.default_rng(0)
    root = tmp / "ds"
    for split, n in (("train", 4), ("test", 2)):
        for c in ("a", "b", "c"):
            for k in range(n):
                if k == 1:
                    (root / split / c).mkdir(parents=True, exist_ok=True)
                    write_video(root / split / c / f"{c}{split}{k}.mkv", rand_frames(rng, 20), fps=10)
                else:
                    write_frames(root / split / c / f"{c}{split}{k}", rand_frames(rng, 13 + k), ".png")
    cache = tmp / "f.h5"
    extract_features(ExtractConfig(dataset=DatasetSpec(str(root)), output=str(cache), weights=str(weights_file),
                                   frame_spec=FrameSpec(size=SIZE), batch_size=8, workers=0), progress=False)
    train_temporal(TemporalConfig(cache=str(cache), out=str(tmp / "run"), hidden=16, epochs=2, seq_len=6,
                                  eval_clips=2, batch_size=4, device="cpu"), progress=False)
    return root, cache, tmp / "run" / "best.pt"


def test_predict_equals_evaluate_on_cached_features(trained):
    root, cache, ckpt = trained
    ev = evaluate_checkpoint(ckpt, cache, "test", device="cpu")
    preds = Predictor(ckpt, device="cpu", batch_size=8, workers=0).predict(
        [root / v for v in ev.videos], top_k=3, progress=False)
    assert [Path(p.input).relative_to(root).as_posix() for p in preds] == ev.videos
    for p, want in zip(preds, ev.probs):
        # Same features to the bit (rounded to the cache's float16), so the same probabilities up to
        # float32 rounding in the head. A predict that skipped the rounding would be off by ~4e-5.
        np.testing.assert_allclose(p.probs, want, rtol=0, atol=1e-6)
        assert p.error is None and p.frames > 0


def test_folder_input_is_searched_recursively(trained):
    root, _, ckpt = trained
    preds = Predictor(ckpt, device="cpu", workers=0).predict([root / "test"], progress=False)
    assert len(preds) == 6 and {p.kind for p in preds} == {"frames", "file"}


def test_window_bounds():
    assert window_bounds(100, 20, 10) == [(s, s + 20) for s in range(0, 81, 10)]
    assert window_bounds(25, 10, 10) == [(0, 10), (10, 20), (15, 25)]  # the tail is covered
    assert window_bounds(5, 10, 3) == [(0, 5)]


def test_windows_count_and_timestamps_json(trained, tmp_path):
    _, _, ckpt = trained
    video = tmp_path / "long.mkv"
    write_video(video, rand_frames(np.random.default_rng(1), 100), fps=25)  # 4 s at 25 fps
    plot = tmp_path / "timeline.png"
    r = CliRunner().invoke(main, ["predict", str(ckpt), str(video), "--window", "20", "--stride", "10", "--json",
                                  "--top-k", "2", "--plot", str(plot), "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.stderr
    (obj,) = json.loads(r.stdout)
    assert set(obj) == {"input", "kind", "frames", "fps", "top_k", "error", "windows"}
    assert obj["input"] == str(video) and obj["kind"] == "file" and obj["frames"] == 100 and obj["error"] is None
    assert obj["fps"] == pytest.approx(25.0)
    assert len(obj["top_k"]) == 2 and all(set(t) == {"label", "prob"} for t in obj["top_k"])
    assert obj["top_k"][0]["prob"] >= obj["top_k"][1]["prob"]
    w = obj["windows"]
    assert len(w) == 9
    assert [x["start_frame"] for x in w] == list(range(0, 81, 10))
    assert [x["end_frame"] for x in w] == list(range(19, 100, 10))
    for x in w:
        assert x["start_time"] == pytest.approx(x["start_frame"] / 25) and x["end_time"] == pytest.approx(x["end_frame"] / 25)
        assert 0 <= x["prob"] <= 1 and isinstance(x["label"], str)
    # the video-level label is the mean of the window probabilities
    pred = Predictor(ckpt, device="cpu", workers=0).predict([video], window=20, stride=10, progress=False)[0]
    np.testing.assert_allclose(pred.probs, np.mean([x.probs for x in pred.windows], 0), rtol=1e-6)
    assert plot.stat().st_size > 1000


def test_window_times_of_a_variable_rate_file_are_its_timestamps(trained, tmp_path):
    """A recording that paused 3 s after frame 11 (a phone's variable frame rate): a window's
    times are its frames' own timestamps, as --live reports them, not frame number / average rate."""
    import av
    from fractions import Fraction

    _, _, ckpt = trained
    video = tmp_path / "vfr.mp4"
    ms = [40 * k for k in range(12)] + [3440 + 40 * k for k in range(12)]
    with av.open(str(video), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(25))
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"bf": "0", "crf": "0"}
        for t, f in zip(ms, rand_frames(np.random.default_rng(2), 24)):
            frame = av.VideoFrame.from_ndarray(f, format="rgb24")
            frame.pts, frame.time_base = t, Fraction(1, 1000)
            for q in s.encode(frame):
                c.mux(q)
        for q in s.encode():
            c.mux(q)
    predictor = Predictor(ckpt, device="cpu", workers=0)
    windows = predictor.predict([video], window=4, stride=4, progress=False)[0].windows
    got = [(w.start_frame, w.end_frame, w.start_time, w.end_time) for w in windows]
    assert got == [(k, k + 3, pytest.approx(ms[k] / 1000), pytest.approx(ms[k + 3] / 1000)) for k in range(0, 24, 4)]
    run = predictor.live(str(video), window=4, stride=4)
    try:
        live = [(w.start_frame, w.end_frame, w.start_time, w.end_time) for w in run]
    finally:
        run.close()
    assert live == [(a, b, pytest.approx(c), pytest.approx(d)) for a, b, c, d in got]


def test_plot_path_inside_an_input_is_refused(trained, tmp_path):
    """--plot into a frame folder would replace one of its frames (or add one): refused before any
    work, the folder as it was."""
    root, _, ckpt = trained
    video = tmp_path / "vid"
    shutil.copytree(root / "test" / "a" / "atest0", video)
    before = {p.name: p.read_bytes() for p in video.iterdir()}
    first = sorted(before)[0]
    for plot, msg in ((video / first, f"is in the input {video}: the plot would add to or overwrite its frames"),
                      (video / "timeline.png", f"is in the input {video}"),
                      (root / "test" / "b" / "btest1.mkv", "is the input")):
        inputs = [str(video), str(root / "test" / "b" / "btest1.mkv")]
        r = CliRunner().invoke(main, ["predict", str(ckpt), *inputs, "--window", "4", "--plot", str(plot),
                                      "--workers", "0", "--no-progress"])
        assert r.exit_code == 2 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in video.iterdir()} == before


def test_bad_inputs_continue_and_exit_nonzero(trained, tmp_path):
    root, _, ckpt = trained
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.mp4").write_bytes(b"")
    good = root / "test" / "a" / "atest0"
    r = CliRunner().invoke(main, ["predict", str(ckpt), str(tmp_path / "missing.avi"), str(tmp_path / "notes.txt"),
                                  str(good), str(tmp_path / "broken.mp4"), "--workers", "0", "--no-progress"])
    assert r.exit_code == 1
    assert str(good) in r.stdout  # the good one is still labelled
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 3 and "Traceback" not in r.stderr
    assert any("missing.avi: no such file" in e for e in errors)
    assert any("unsupported file type .txt" in e for e in errors)
    assert any("broken.mp4" in e for e in errors)
    assert "3 of 4 input(s) failed" in r.stderr
    # in the order they were given: a missing file listed first was reported after every video
    assert ["missing.avi" in errors[0], "notes.txt" in errors[1], "broken.mp4" in errors[2]] == [True] * 3, errors
    r = CliRunner().invoke(main, ["predict", str(ckpt), str(good), "--stride", "4"])  # no windows to step: refused
    assert r.exit_code == 2 and "--stride needs --window" in r.stderr


def test_bad_checkpoints(trained, tmp_path):
    root, cache, ckpt = trained
    (tmp_path / "corrupt.pt").write_bytes(ckpt.read_bytes()[:1000])
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    ck = torch.load(ckpt, weights_only=True)
    ck["schema_version"] = 99
    torch.save(ck, tmp_path / "future.pt")
    for f, msg in (("missing.pt", "checkpoint not found"), ("corrupt.pt", "a damaged or incomplete torch.save file"),
                   ("foreign.pt", "not a checkpoint written by"), ("future.pt", "schema 99"),
                   (str(ckpt.parent), f"{ckpt.parent} is a folder; pass {ckpt.parent / 'best.pt'}")):
        r = CliRunner().invoke(main, ["predict", str(tmp_path / f), str(root / "test")])
        assert r.exit_code == 1 and msg in r.stderr and "Traceback" not in r.stderr, (f, r.stderr)


def test_moved_weights_need_matching_sha(trained, tmp_path, weights_file):
    root, _, ckpt = trained
    moved = tmp_path / "moved.pt"
    shutil.copy(weights_file, moved)
    ck = torch.load(ckpt, weights_only=True)
    ck["cache"]["weights"]["path"] = str(tmp_path / "gone.pt")
    torch.save(ck, tmp_path / "ckpt.pt")
    with pytest.raises(Exception, match="pass --weights PATH"):
        Predictor(tmp_path / "ckpt.pt", device="cpu")
    Predictor(tmp_path / "ckpt.pt", device="cpu", weights=moved)  # same bytes: accepted
    sd = torch.load(weights_file, weights_only=True)
    sd["features.0.0.weight"] = sd["features.0.0.weight"] + 1
    torch.save(sd, tmp_path / "other.pt")
    with pytest.raises(Exception, match="is not the backbone this model was trained with"):
        Predictor(tmp_path / "ckpt.pt", device="cpu", weights=tmp_path / "other.pt")
    with pytest.raises(WeightsError, match=f"--weights {tmp_path} is a folder"):
        Predictor(tmp_path / "ckpt.pt", device="cpu", weights=tmp_path)


def test_float16_features_predict_on_cpu_in_float32(trained, tmp_path, caplog):
    """A cache extracted in float16 on a GPU: its head still labels videos on a CPU (float16 autocast
    is for CUDA), with the backbone in float32 and a warning saying so."""
    root, _, ckpt = trained
    ck = torch.load(ckpt, weights_only=True)
    ck["cache"]["precision"] = "float16"
    torch.save(ck, tmp_path / "fp16.pt")
    videos = [root / "test" / "a" / "atest0", root / "test" / "b" / "btest1.mkv"]
    want = Predictor(ckpt, device="cpu", workers=0).predict(videos, progress=False)
    got = Predictor(tmp_path / "fp16.pt", device="cpu", workers=0).predict(videos, progress=False)
    assert "computed in float16 on a GPU; on the CPU the backbone runs in float32" in caplog.text
    for g, w in zip(got, want):
        assert g.error is None and np.array_equal(g.probs, w.probs)


def test_frame_folders_for_a_model_that_keeps_a_frame_rate(trained, tmp_path):
    """A model trained with --fps on video files keeps a set frame rate: a frame folder given to
    predict needs its own rate. Given only frame folders, that is said up front in one line (before
    any work); beside videos, each folder is a failed input and the videos are still labelled.
    --folder-fps gives it, and the timeline's seconds follow it."""
    root, _, ckpt = trained
    ck = torch.load(ckpt, weights_only=True)
    ck["cache"]["selection"]["fps"] = 5.0
    torch.save(ck, tmp_path / "fps.pt")
    folder, video = root / "test" / "a" / "atest0", root / "test" / "b" / "btest1.mkv"  # 13 frames; 20 at 10 fps
    need = ("this model keeps 5 frames/s, so frame folders need their frame rate: add --folder-fps (the rate they "
            "were extracted at, e.g. 30 for HMDB51, 25 for UCF101)")
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "fps.pt"), str(folder), "--workers", "0", "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.strip() == "error: " + need.replace("frame folders", f"frame folders such as {folder}")
    r = CliRunner().invoke(main, ["-q", "predict", str(tmp_path / "fps.pt"), str(video), str(folder), "--workers",
                                  "0", "--no-progress"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stdout.startswith(str(video)) and len(r.stdout.splitlines()) == 1  # the video is labelled
    assert r.stderr.splitlines() == [f"error: {folder}: {need}", "1 of 2 input(s) failed"]
    r = CliRunner().invoke(main, ["predict", str(tmp_path / "fps.pt"), str(video), str(folder), "--folder-fps", "10",
                                  "--window", "2", "--json", "--workers", "0", "--no-progress"])
    assert r.exit_code == 0, r.stderr
    out = {Path(p["input"]).name: p for p in json.loads(r.stdout)}
    f, v = out[folder.name], out[video.name]
    assert f["fps"] == 10 and (f["frames"], v["frames"]) == (7, 10)  # every other frame of 13 and 20 at 10 fps
    assert [(w["start_frame"], w["start_time"]) for w in f["windows"]][:2] == [(0, 0.0), (4, 0.4)]
    r = CliRunner().invoke(main, ["predict", str(ckpt), "--live", str(video), "--folder-fps", "10"])
    assert r.exit_code == 2 and "--folder-fps is for frame-folder INPUTs, not --live" in r.stderr


def _peak_rss_mb(args: list[str]) -> float:
    code = ("import resource, runpy, sys; sys.argv = ['cli.py'] + sys.argv[1:]\n"
            "try:\n    runpy.run_path(sys.argv[0] if False else %r, run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)" % str(REPO / "cli.py"))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return float(r.stdout.rsplit("PEAK", 1)[1])


@pytest.mark.slow
def test_memory_flat_in_video_length_real_subprocess(tmp_path, weights_file):
    """`python cli.py predict` on a short and a 10x longer video: peak memory must not follow length."""
    rng = np.random.default_rng(0)
    root = tmp_path / "ds"
    for split in ("train", "test"):
        for c in ("a", "b"):
            write_frames(root / split / c / f"{c}{split}", rand_frames(rng, 8, 48, 64))
    cache = tmp_path / "f.h5"
    extract_features(ExtractConfig(dataset=DatasetSpec(str(root)), output=str(cache), weights=str(weights_file),
                                   frame_spec=FrameSpec(size=96), batch_size=16, workers=0), progress=False)
    train_temporal(TemporalConfig(cache=str(cache), out=str(tmp_path / "run"), hidden=8, epochs=1, seq_len=4,
                                  device="cpu", val_split="test"), progress=False)  # one video a class: no carve
    frames = rand_frames(rng, 300, 96, 128)
    write_video(tmp_path / "short.avi", frames, fps=30)
    write_video(tmp_path / "long.avi", frames * 10, fps=30)  # 3000 frames: 83 MB as 96x96 uint8 if held
    peaks = {}
    for name in ("short", "long"):
        peaks[name] = _peak_rss_mb(["predict", str(tmp_path / "run" / "best.pt"), str(tmp_path / f"{name}.avi"),
                                    "--window", "64", "--json", "--batch-size", "32", "--workers", "1", "--no-progress"])
    assert peaks["long"] - peaks["short"] < 40, peaks


def test_real_subprocess_predict(trained, tmp_path):
    """`python cli.py predict` exactly as a user types it."""
    root, _, ckpt = trained
    r = subprocess.run([sys.executable, str(REPO / "cli.py"), "predict", str(ckpt), str(root / "test" / "b"),
                        "--top-k", "2", "--no-progress"], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2 and all(ln.startswith(str(root / "test" / "b")) for ln in lines)
    assert all(len(ln.split()) == 5 for ln in lines)  # input, then 2 x (label, probability)


def test_a_folder_of_videos_with_an_image_beside_them_is_no_frame_folder(tmp_path, caplog):
    """A poster or thumbnail among video files made their folder a one-frame 'video', and its
    videos were dropped without a word; a hidden ._x.jpg sidecar (macOS) did too."""
    import logging

    from pipeline.predict import find_inputs

    rng = np.random.default_rng(0)
    root = tmp_path / "pred"
    (root / "sub").mkdir(parents=True)
    (root / "hid").mkdir()
    for f in ("a.mp4", "sub/b.mkv", "sub/c.mp4", "hid/v.mp4"):
        (root / f).write_bytes(b"")  # found by name; decoding would report what is wrong with them
    write_frames(root / "frames", rand_frames(rng, 2))
    for f in ("poster.jpg", "sub/thumb.png", "hid/._v.jpg"):
        Image.fromarray(rand_frames(rng, 1)[0]).save(root / f, format="PNG")
    with caplog.at_level(logging.WARNING):
        found, errors = find_inputs([root])
    assert not errors and found == [(root / "a.mp4", "file"), (root / "frames", "frames"),
                                    (root / "hid" / "v.mp4", "file"), (root / "sub" / "b.mkv", "file"),
                                    (root / "sub" / "c.mp4", "file")]
    assert f"ignored the images in {root / 'sub'}: it holds video files" in caplog.text
    assert find_inputs([root / "sub"]) == ([(root / "sub" / "b.mkv", "file"), (root / "sub" / "c.mp4", "file")], [])


def test_overlapping_inputs_list_each_video_once(tmp_path, caplog):
    """`predict data data/sub`, a file given twice, or a link beside the folder it points to listed
    the same videos twice (two rows, decoded twice); an input that adds nothing new is no error."""
    import logging

    from pipeline.predict import find_inputs

    rng = np.random.default_rng(0)
    root = tmp_path / "pred"
    (root / "sub").mkdir(parents=True)
    for f in ("a.mp4", "sub/b.mkv"):
        (root / f).write_bytes(b"")
    write_frames(root / "sub" / "frames", rand_frames(rng, 2))
    (tmp_path / "link").symlink_to(root / "sub")
    want = [(root / "a.mp4", "file"), (root / "sub" / "b.mkv", "file"), (root / "sub" / "frames", "frames")]
    with caplog.at_level(logging.INFO):
        found, errors = find_inputs([root, root / "sub", root / "a.mp4", tmp_path / "link",
                                     root / "sub" / "frames", root])
    assert not errors and found == want
    assert f"skipped {root / 'sub'}: an earlier input already lists it" in caplog.text
    # the other way round: the folder after its parts still adds only what is new
    found, errors = find_inputs([root / "sub" / "frames", root / "a.mp4", root / "a.mp4", root])
    assert not errors and found == [(root / "sub" / "frames", "frames"), (root / "a.mp4", "file"),
                                    (root / "sub" / "b.mkv", "file")]
    # a folder whose every video an earlier input listed is skipped with a note, not an error
    caplog.clear()
    with caplog.at_level(logging.INFO):
        found, errors = find_inputs([root / "sub" / "b.mkv", root / "sub" / "frames", tmp_path / "link"])
    assert not errors and len(found) == 2
    assert f"skipped {tmp_path / 'link'}: an earlier input already lists" in caplog.text
    # a second name of one video in one folder (a link, a hard link) is one video, with a note
    (root / "sub" / "latest.mkv").symlink_to(root / "sub" / "b.mkv")
    os.link(root / "a.mp4", root / "copy.mp4")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        found, errors = find_inputs([root])
    assert not errors and found == want
    assert f"skipped {root / 'sub' / 'latest.mkv'}: the same file as {root / 'sub' / 'b.mkv'}" in caplog.text
    assert f"skipped {root / 'copy.mp4'}: the same file as {root / 'a.mp4'}" in caplog.text
    # an empty folder, and one holding only a link back to itself, are still errors
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "again").symlink_to(tmp_path / "loop")
    found, errors = find_inputs([tmp_path / "empty", tmp_path / "loop"])
    assert not found and [e.error for e in errors] == [f"{tmp_path / 'empty'}: no videos or frame folders inside",
                                                        f"{tmp_path / 'loop'}: no videos or frame folders inside"]


def test_folders_of_images_frame_folders_do_not_take_are_named(tmp_path, caplog):
    """A folder of .bmp or .webp frames was passed over without a word inside a folder given to
    predict, and named alone it was 'no videos or frame folders inside'."""
    import logging

    from pipeline.predict import find_inputs

    rng = np.random.default_rng(0)
    root = tmp_path / "pred"
    write_frames(root / "jpgs", rand_frames(rng, 2))
    for ext, fmt in ((".bmp", "BMP"), (".webp", "WEBP")):
        (root / ext[1:]).mkdir()
        for i in range(2):
            Image.fromarray(rand_frames(rng, 1)[0]).save(root / ext[1:] / f"{i:05d}{ext}", format=fmt)
    (root / "empty").mkdir()
    with caplog.at_level(logging.WARNING):
        found, errors = find_inputs([root])
    assert found == [(root / "jpgs", "frames")] and not errors
    for kind in ("bmp", "webp"):
        assert f"ignored {root / kind}: its images are .{kind}; a frame folder holds jpg or png frames" in caplog.text
    assert "empty" not in caplog.text  # an empty folder is no video, and nothing to say
    found, errors = find_inputs([root / "bmp", root / "empty"])
    assert not found and [e.error for e in errors] == [
        f"{root / 'bmp'}: its images are .bmp, and a frame folder holds jpg or png frames (convert them)",
        f"{root / 'empty'}: no videos or frame folders inside"]
