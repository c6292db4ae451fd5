"""Live video: a file at its own frame rate, drops when the model is slow, an MPEG-TS stream from a
local ``python -m http.server``, streams cut half way, Ctrl-C, reconnection. Each under ~10 s."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, damage_packet, rand_frames, threads_of_a_new_thread

from cli import main
from pipeline.config import FrameSelection
from pipeline.data import apply_selection
from pipeline.demo import write_video
from pipeline.predict import Predictor
from pipeline.errors import StreamError
from pipeline.stream import LiveStream, _Selector

pytest.importorskip("onnxruntime")

FPS = 30
W, S = 6, 3  # window (the model's seq-len) and stride, in kept frames


def write_ts(path: Path, frames: list[np.ndarray], fps: int = FPS) -> Path:
    """MPEG-TS (mpeg4): a container that streams, readable front to back without seeking."""
    write_video(path, frames, fps)  # .ts: MPEG-TS, mpeg4
    return path


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("www")
    write_video(d / "clip.mkv", rand_frames(rng, 45), fps=FPS)  # 1.5 s, lossless
    write_video(d / "short.mkv", rand_frames(rng, 15), fps=FPS)
    write_video(d / "long.mkv", rand_frames(rng, 300), fps=FPS)  # 10 s
    data = write_ts(d / "clip.ts", rand_frames(rng, 60)).read_bytes()  # 2 s
    (d / "cut.ts").write_bytes(data[: len(data) // 2 + 77])  # cut inside a 188-byte TS packet
    noise = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(30)]
    write_video(d / "late.mp4", noise, fps=FPS)  # libx264, its index (moov) at the end: 77 kB
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(media):
    """A real ``python -m http.server`` (no Range requests) serving ``media``."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "-d", str(media)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("http.server did not start")
            time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=5)


@pytest.fixture(scope="module")
def onnx_predictor(exported) -> Predictor:
    return Predictor(exported[1].out, batch_size=8, workers=0)


def _windows_over(n: int) -> int:
    """Windows of W frames every S over n frames, and one flush with the end where they leave a tail."""
    return (n - W) // S + 1 + ((n - W) % S > 0)


def _check_windows(windows, summary, fps: float = FPS) -> None:
    """Windows every S frames the model took, and one flush with the end where those leave a tail,
    with increasing times that are the frames' own."""
    assert summary.frames_classified + summary.dropped == summary.frames_kept
    assert len(windows) == _windows_over(summary.frames_classified)
    assert [w.index for w in windows] == list(range(len(windows)))
    ends = [w.end_time for w in windows]
    assert all(b > a for a, b in zip(ends, ends[1:]))
    for w in windows:
        assert w.start_time == pytest.approx(w.start_frame / fps, abs=1e-3)
        assert w.end_time == pytest.approx(w.end_frame / fps, abs=1e-3)
        assert w.latency >= 0 and w.end_frame - w.start_frame >= W - 1
    assert summary.windows == len(windows) and summary.latency_p95 >= summary.latency_p50 > 0


def test_file_in_real_time_gives_the_file_timeline(onnx_predictor, exported, media):
    run = onnx_predictor.live(str(media / "clip.mkv"), realtime=True, stride=S)
    t = time.perf_counter()
    try:
        windows = list(run)
    finally:
        run.close()
    took, s = time.perf_counter() - t, run.summary()
    assert took > 44 / FPS - 0.05  # played at its own rate: 45 frames at 30 fps
    assert (s.frames_read, s.frames_kept, s.ended, s.error) == (45, 45, "end of file", None)
    _check_windows(windows, s)
    # The same frames through the file path (window W, stride S): the same windows. Frames the
    # live run dropped (a busy machine) would shift them, so that part needs a run without drops.
    ref = onnx_predictor.predict([media / "clip.mkv"], window=W, stride=S, progress=False)[0].windows
    if s.dropped == 0:
        assert [(w.start_frame, w.end_frame, w.label) for w in windows] == \
               [(w.start_frame, w.end_frame, w.label) for w in ref]
        np.testing.assert_allclose([w.probs for w in windows], [w.probs for w in ref], atol=1e-4, rtol=0)
    # A file without --realtime is read as fast as the model goes and never dropped: with the torch
    # model too, live windows are the file's windows.
    torch_predictor = Predictor(exported[0], device="cpu", workers=0)
    run = torch_predictor.live(str(media / "short.mkv"), stride=S)
    try:
        torch_windows = list(run)
    finally:
        run.close()
    ref = torch_predictor.predict([media / "short.mkv"], window=W, stride=S, progress=False)[0].windows
    assert run.summary().dropped == 0 and len(torch_windows) == len(ref) == 4
    assert [(w.start_frame, w.end_frame, w.label) for w in torch_windows] == \
           [(w.start_frame, w.end_frame, w.label) for w in ref]
    np.testing.assert_allclose([w.probs for w in torch_windows], [w.probs for w in ref], atol=1e-4, rtol=0)
    # a window longer than the whole source: its frames are one window, as the file path labels it
    run = torch_predictor.live(str(media / "short.mkv"), window=500)
    try:
        whole = list(run)
    finally:
        run.close()
    ref = torch_predictor.predict([media / "short.mkv"], window=500, progress=False)[0].windows
    assert run.summary().windows == len(whole) == len(ref) == 1
    assert (whole[0].start_frame, whole[0].end_frame, whole[0].label) == (ref[0].start_frame, ref[0].end_frame,
                                                                          ref[0].label)
    np.testing.assert_allclose(whole[0].probs, ref[0].probs, atol=1e-4, rtol=0)
    # a stride that does not end flush with the source (15 frames, window 6, stride 4): the last
    # window is the source's last 6 frames, as the file path's; its last frame was left unlabelled
    run = torch_predictor.live(str(media / "short.mkv"), stride=4)
    try:
        tail = list(run)
    finally:
        run.close()
    ref = torch_predictor.predict([media / "short.mkv"], window=W, stride=4, progress=False)[0].windows
    assert [(w.start_frame, w.end_frame) for w in tail] == [(w.start_frame, w.end_frame) for w in ref]
    assert tail[-1].end_frame == ref[-1].end_frame == 14 and run.summary().windows == len(tail) == 4
    np.testing.assert_allclose([w.probs for w in tail], [w.probs for w in ref], atol=1e-4, rtol=0)


class _Slow:
    """A classifier that takes ``delay`` seconds per batch of frames, recording the batch sizes."""

    def __init__(self, clf, delay: float) -> None:
        self.clf, self.delay, self.sizes = clf, delay, []

    def __getattr__(self, name):
        return getattr(self.clf, name)

    def features(self, frames):
        self.sizes.append(frames.shape[0])
        time.sleep(self.delay)
        return self.clf.features(frames)


def test_slow_model_drops_frames_and_counts_them(onnx_predictor, media):
    from pipeline.predict import LiveRun

    slow = _Slow(onnx_predictor.classifier, 0.12)  # ~8 batches/s against 30 frames/s
    run = LiveRun(slow, str(media / "clip.mkv"), realtime=True, stride=S)
    try:
        windows = list(run)
    finally:
        run.close()
    s = run.summary()
    assert s.frames_kept == 45 and s.dropped >= 10, s
    _check_windows(windows, s)
    assert max(slow.sizes) <= 2  # never more than the queue (2 frames) waiting: no unbounded backlog
    assert [w.dropped for w in windows] == sorted(w.dropped for w in windows)
    assert max(w.latency for w in windows) < 1.5


def test_http_stream_from_a_local_server(exported, server):
    r = CliRunner().invoke(main, ["predict", "--runtime", "onnx", str(exported[1].out), "--live",
                                  f"{server}/clip.ts", "--realtime", "--json", "--stride", str(S)])
    assert r.exit_code == 0, r.stderr
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    *windows, last = lines
    s = last["summary"]
    assert (s["frames_read"], s["ended"], s["error"]) == (60, "end of stream", None)
    assert s["windows"] == len(windows) == _windows_over(s["frames_classified"])
    assert set(windows[0]) == {"window", "start_frame", "end_frame", "start_time", "end_time", "label", "prob",
                               "latency_ms", "dropped"}
    ends = [w["end_time"] for w in windows]
    assert all(b > a for a, b in zip(ends, ends[1:])) and ends[-1] == pytest.approx(59 / FPS, abs=0.1)
    assert s["latency_ms_p95"] >= s["latency_ms_p50"] > 0

    # An mp4 with its index at the end cannot be read from a server without Range requests.
    r = CliRunner().invoke(main, ["predict", str(exported[1].out), "--live", f"{server}/late.mp4"])
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    (err,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "late.mp4" in err and "Range requests" in err and "MPEG-TS" in err


class _CutHandler(BaseHTTPRequestHandler):
    """Announces the whole file, sends half of it, and closes the connection: a stream lost mid-way."""

    data = b""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.data)))
        self.end_headers()
        self.wfile.write(self.data[: len(self.data) // 2])
        self.close_connection = True

    def log_message(self, *args):
        pass


def test_stream_cut_half_way_ends_with_one_line(exported, server, media):
    model = str(exported[1].out)
    # a truncated copy: the server sends what there is, the stream just ends early
    r = CliRunner().invoke(main, ["predict", model, "--live", f"{server}/cut.ts"])
    assert r.exit_code == 0 and "Traceback" not in r.stderr, r.stderr
    summary = r.stdout.strip().splitlines()[-1]
    assert summary.startswith("end of stream: ") and "frames read" in summary
    assert 15 < int(summary.split(" frames read")[0].rsplit(" ", 1)[1]) < 60
    # the connection dies before the announced length: the source is lost, one error line
    handler = type("Cut", (_CutHandler,), {"data": (media / "clip.ts").read_bytes()})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        r = CliRunner().invoke(main, ["predict", model, "--live", f"http://127.0.0.1:{srv.server_address[1]}/x.ts"])
    finally:
        srv.shutdown()
        srv.server_close()
    assert r.exit_code == 1 and "Traceback" not in r.stderr, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "/x.ts: lost after" in errors[0] and "--reconnect retries" in errors[0]
    assert r.stdout.strip().splitlines()[-1].startswith("lost: ")


def test_ctrl_c_stops_cleanly_with_a_summary(exported, media):
    # Ctrl-C as in a terminal: a shell's background job (a CI runner's, `cmd &`) passes SIGINT on as
    # ignored, and Python then never raises KeyboardInterrupt; the child starts with it restored.
    proc = subprocess.Popen([sys.executable, str(REPO / "cli.py"), "predict", str(exported[1].out), "--live",
                             str(media / "long.mkv"), "--realtime", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        got = [proc.stdout.readline() for _ in range(2)]  # two windows: it is running
        assert all(json.loads(ln)["window"] in (0, 1) for ln in got), got
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    s = json.loads(out.strip().splitlines()[-1])["summary"]
    assert s["ended"] == "interrupted" and s["error"] is None and s["windows"] >= 2
    assert s["frames_read"] < 300


def test_reconnect_with_backoff(server):
    dead = f"http://127.0.0.1:{_free_port()}/clip.ts"  # nothing listens there
    stream = LiveStream(dead, reconnect=True, retries=2, backoff=0.01)
    with stream:
        assert list(stream) == []
    assert stream.stats.reconnects == 2 and stream.ended == "lost"
    assert stream.error.startswith(f"live source {dead}: ") and "gave up after 2 reconnection attempts" in stream.error
    # A stream that ends is reopened: frame numbers and times go on increasing.
    stream = LiveStream(f"{server}/clip.ts", reconnect=True, backoff=0.01, transform=lambda f: f[:, :4, :4])
    frames = []
    with stream:
        for f in stream:
            frames.append(f)
            if f.index >= 90:
                break
    assert stream.stats.reconnects >= 1 and stream.error is None and stream.ended == "stopped"
    assert [f.index for f in frames] == sorted({f.index for f in frames})
    times = [f.time for f in frames]
    assert all(b > a for a, b in zip(times, times[1:]))


def test_a_window_never_spans_a_reconnection(onnx_predictor, server):
    """clip.ts (60 frames) ends and is reopened: frames 0-59 come from the first connection, 60-119
    from the second, after a gap of the backoff (it could be minutes). No window mixes the two:
    the window fills again from frame 60, and the frames after it come in the same windows as
    from a fresh start."""
    run = onnx_predictor.live(f"{server}/clip.ts", reconnect=True, stride=S)
    windows = []
    try:
        for w in run:
            windows.append(w)
            if w.end_frame >= 100:
                break
    finally:
        run.close()
    s = run.summary()
    assert s.reconnects >= 1 and s.frames_read >= 101, s
    assert not [(w.start_frame, w.end_frame) for w in windows if w.start_frame < 60 <= w.end_frame]
    after = [w for w in windows if w.start_frame >= 60]
    assert after and all(w.end_frame - w.start_frame >= W - 1 for w in windows)
    if s.dropped == 0:  # a busy machine may drop frames (a live source): they would shift the windows
        assert (after[0].start_frame, after[0].end_frame) == (60, 65)
        assert [(w.start_frame, w.end_frame) for w in windows] == \
               [(a, a + W - 1) for a in range(0, 60 - W + 1, S)] + [(a, a + W - 1) for a in range(60, 97, S)]


def test_joined_recordings_keep_time_going_forward(tmp_path, caplog):
    """Two MPEG-TS recordings joined into one file (as `cat a.ts b.ts` or a camera that restarts
    its clock gives): the second one's timestamps start over. Times go on forward, one frame
    period across the seam, with one warning, and --fps keeps its rate over both halves (the
    second half was lost before: 25 of 50 frames kept at 5 frames/s)."""
    rng = np.random.default_rng(3)
    a = write_ts(tmp_path / "a.ts", rand_frames(rng, 50), fps=10).read_bytes()
    b = write_ts(tmp_path / "b.ts", rand_frames(rng, 50), fps=10).read_bytes()
    (tmp_path / "ab.ts").write_bytes(a + b)
    for sel, kept in ((FrameSelection(), 100), (FrameSelection(fps=5.0), 50)):
        stream = LiveStream(str(tmp_path / "ab.ts"), selection=sel, transform=lambda f: f[:, :2, :2])
        with stream:
            frames = list(stream)
        times = np.array([f.time for f in frames])
        assert stream.stats.read == 100 and len(frames) == kept and stream.stats.jumps == 1, sel
        np.testing.assert_allclose(np.diff(times), 10 / kept, atol=1e-6)  # evenly spaced, across the seam too
    assert caplog.text.count("its timestamps jumped from") == 2  # once per stream


def test_a_file_keeps_its_pauses_and_a_stream_bridges_a_clock_jump(media, server):
    """100 s of nothing between two frames: in a file that is a pause in the recording, kept; on a
    stream (a real stall that long would hit --timeout first) it is a jump of the source's clock,
    bridged by one frame period, with a warning."""
    import av
    from fractions import Fraction

    path = media / "gap.ts"
    with av.open(str(path), "w", format="mpegts") as c:
        s = c.add_stream("mpeg2video", rate=10)
        s.width = s.height = 32
        s.pix_fmt = "yuv420p"
        for i in range(40):
            f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 6 * i, np.uint8), format="rgb24")
            f.pts, f.time_base = i + (1000 if i >= 20 else 0), Fraction(1, 10)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    for source, step, jumps in ((str(path), 100.1, 0), (f"{server}/gap.ts", 0.1, 1)):
        stream = LiveStream(source, transform=lambda f: f[:, :2, :2])
        with stream:
            times = [f.time for f in stream]
        assert len(times) == 40 and stream.stats.jumps == jumps, source
        assert times[20] - times[19] == pytest.approx(step, abs=1e-3), source
        assert np.diff(times[:20]) == pytest.approx(0.1, abs=1e-3) and np.diff(times[20:]) == pytest.approx(0.1, abs=1e-3)


def test_a_damaged_packet_is_skipped_not_the_end_of_the_source(tmp_path, caplog):
    """A damaged packet (a bad sector, a lost datagram) costs its frame; the source goes on to its
    end, with one warning and the count in the stats (it used to end as 'lost' there)."""
    path = tmp_path / "v.avi"
    write_video(path, rand_frames(np.random.default_rng(0), 30), codec="mjpeg")
    damage_packet(path, 5)
    stream = LiveStream(str(path), transform=lambda f: f[:, :2, :2])
    with stream:
        frames = list(stream)
    assert len(frames) == 29 and stream.stats.damaged == 1
    assert stream.ended == "end of file" and stream.error is None
    assert caplog.text.count("skipped a damaged packet") == 1


def test_the_reader_threads_one_thread_setting_is_undone_on_close(tmp_path, threads):
    """The reader resizes with one intra-op thread (the model has the cores); threads started after
    the stream closes get the caller's count again, not the reader's 1."""
    path = tmp_path / "v.avi"
    write_video(path, rand_frames(np.random.default_rng(0), 5), codec="mjpeg")
    with LiveStream(str(path), transform=lambda f: f[:, :2, :2]) as stream:
        assert len(list(stream)) == 5
    assert threads_of_a_new_thread() == threads


def test_standard_input_and_a_named_pipe_are_live_streams(exported, media, tmp_path, caplog):
    """`ffmpeg ... -f mpegts - | predict --live -`, or a FIFO: read as a live stream that ends with its
    writer. A FIFO was refused as "no such file" (it is no regular file)."""
    import os

    import torch

    fifo = tmp_path / "in.ts"
    os.mkfifo(fifo)
    data = (media / "clip.ts").read_bytes()

    def feed():
        with open(fifo, "wb") as f:
            f.write(data)

    threading.Thread(target=feed, daemon=True).start()
    with LiveStream(str(fifo), drop=False, reconnect=True) as stream:  # every frame, to compare them all
        got = list(stream)
    assert stream.kind == "pipe" and stream.ended == "end of stream" and stream.error is None
    assert "--reconnect has no effect on a pipe: it ends where it ends" in caplog.text
    with LiveStream(str(media / "clip.ts")) as stream:
        want = list(stream)
    assert len(got) == len(want) == 60
    assert all(torch.equal(a.image, b.image) and a.time == b.time for a, b in zip(got, want))
    with open(media / "clip.ts", "rb") as stdin:
        r = subprocess.run([sys.executable, str(REPO / "cli.py"), "predict", str(exported[1].out), "--live", "-",
                            "--json", "--stride", str(S)], stdin=stdin, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    *windows, last = [json.loads(ln) for ln in r.stdout.splitlines()]
    s = last["summary"]
    assert (s["frames_read"], s["ended"], s["error"]) == (60, "end of stream", None) and len(windows) >= 1


def test_reconnect_does_not_retry_a_missing_file(tmp_path):
    with pytest.raises(StreamError, match=f"live source {tmp_path / 'none.ts'}: no such file"):
        LiveStream(str(tmp_path / "none.ts"), reconnect=True, backoff=0.01)


def test_a_stream_stopped_before_its_reader_ran_closes_the_source(media, monkeypatch):
    """A file is opened up front, in the caller's thread; stopped before the reader took it, the
    reader still closes it (it used to be left open)."""
    import av

    closed = []
    monkeypatch.setattr(av.container.InputContainer, "close",
                        lambda self, real=av.container.InputContainer.close: (closed.append(self), real(self))[1])
    stream = LiveStream(str(media / "clip.ts"))
    opened = stream._first[0]
    stream._stop.set()  # as close() does, here before the thread starts
    with stream:
        assert list(stream) == []
    assert closed == [opened] and stream._first is None and stream.ended == "stopped"


def test_a_failing_reader_ends_the_stream_as_an_error(monkeypatch):
    """An unexpected error in the reader thread (here: opening raises what no source error is)
    ends the run as lost with that error, not as a quiet stop (exit 0)."""
    import pipeline.stream as S

    def broken(*a):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(S, "_open", broken)
    source = f"http://127.0.0.1:{_free_port()}/clip.ts"
    stream = LiveStream(source, reconnect=True, backoff=0.01)
    with stream:
        assert list(stream) == []
    assert stream.ended == "lost"
    assert stream.error == f"live source {source}: the reader failed (ZeroDivisionError: division by zero)"


def test_stream_selection_is_the_file_selection():
    times = list(np.cumsum(np.r_[0, np.random.default_rng(0).uniform(0.02, 0.05, 199)]))  # jittery ~30 fps
    for sel in (FrameSelection(fps=10), FrameSelection(stride=3), FrameSelection(fps=12, stride=2),
                FrameSelection(fps=100)):
        pick = _Selector(sel)
        assert [i for i, t in enumerate(times) if pick.keep(t)] == apply_selection(times, len(times), sel), sel


def test_live_option_combinations_are_checked_first(exported, media):
    model = str(exported[1].out)
    for args, msg in ((["--live", str(media / "clip.mkv"), str(media / "clip.mkv")], "not both"),
                      ([str(media / "clip.mkv"), "--realtime"], "--realtime needs --live SOURCE"),
                      ([str(media / "clip.mkv"), "--reconnect"], "--reconnect needs --live SOURCE"),
                      ([str(media / "clip.mkv"), "--timeout", "3"], "--timeout needs --live SOURCE"),
                      (["--live", str(media / "clip.mkv"), "--top-k", "3"], "--top-k is for INPUTs"),
                      (["--live", str(media / "clip.mkv"), "--plot", "t.png"], "--plot is for INPUTs"),
                      ([], "give at least one INPUT"),
                      (["--live", str(media / "nothing.mkv")], "live source " + str(media / "nothing.mkv") + ": no such file"),
                      (["--live", str(media)], f"live source {media} is a folder: --live reads a video file")):
        r = CliRunner().invoke(main, ["predict", model, *args])
        assert r.exit_code in (1, 2) and msg in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


@pytest.mark.parametrize("ext, scheme", [(".avi", ""), (".mkv", ""), (".mkv", "file://")])
def test_a_truncated_file_read_live_says_so(tmp_path, caplog, ext, scheme):
    """predict on a cut file warns 'truncated: decoded 31 frames...'; --live on the same file ended
    as a plain 'end of file'. It now says the same, and a whole file still says nothing."""
    import logging

    from conftest import cut_file

    path = tmp_path / f"v{ext}"
    write_video(path, rand_frames(np.random.default_rng(7), 120, 24, 32), fps=25)
    with caplog.at_level(logging.WARNING), LiveStream(str(path), transform=lambda f: f[:, :2, :2]) as stream:
        assert len(list(stream)) == 120
    assert "truncated" not in caplog.text
    cut_file(path, path.stat().st_size // 2)
    with caplog.at_level(logging.WARNING), LiveStream(f"{scheme}{path}", transform=lambda f: f[:, :2, :2]) as stream:
        n = len(list(stream))
    assert 30 < n < 90 and stream.ended == "end of file" and stream.error is None
    assert f"{path}: truncated: decoded {n} " in caplog.text and "bytes its container declares" in caplog.text
