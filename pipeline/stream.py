"""Live video sources as an iterator of timestamped frames. Knows nothing about models.

A source is a V4L2 device (``/dev/video0``), a URL FFmpeg reads (``rtsp://``, ``http://``, ...),
or a video file, played as fast as it decodes or, with ``realtime``, at its own frame rate. A
reader thread decodes, applies the frame selection (``--fps``, ``--stride`` of the model's cache,
as the extraction kept frames) and an optional ``transform`` (the resize), and hands frames over
through a bounded queue of ``queue_size`` frames. When the consumer is slower than a live source
the *oldest* queued frame is dropped and counted, so the consumer always gets the newest frames
and memory never grows; a file read as fast as it decodes waits for the consumer instead (nothing
is dropped, and the result does not depend on the consumer's speed).

A source that fails or ends mid-stream ends the iteration, with ``error`` saying why; with
``reconnect`` it is reopened with exponential backoff, and frame numbers and times continue (a new
connection starts at the wall-clock time since the first frame, never before the last frame). Each
frame says which connection it came from, so a consumer can tell frames that follow each other
from frames on either side of a gap.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch

from .config import FrameSelection
from .data import RateSampler, file_truncation, frame_rgb, rate_slack, video_stream
from .errors import StreamError
from .runtime import threads_per_thread

log = logging.getLogger(__name__)

SourceKind = Literal["device", "url", "file", "pipe"]
STDIN = ("-", "pipe:", "pipe:0")  # standard input, as ffmpeg names it
ENDS = ("file", "pipe")  # sources that end where they end: no reconnecting
_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_NEEDS_SEEK = (".mp4", ".mov", ".m4v", ".3gp")
MAX_GAP = 60.0  # seconds: a longer step ahead in a source's timestamps is a jump of its clock, not a pause
MAX_DAMAGED = 100  # damaged packets in a row that end a connection (a stream that decodes to nothing)


class StreamFrame(NamedTuple):
    image: torch.Tensor  # (3, H, W) uint8 RGB in (H, W, 3) memory, or what ``transform`` made of it
    time: float  # seconds since the first frame of the stream (source timestamps)
    index: int  # frame number in the source, counted over every decoded frame (and reconnects)
    arrival: float  # time.perf_counter() when the source delivered it (for latency)
    connection: int = 0  # 0 for the first opening of the source, then one more after each reconnection


@dataclass
class StreamStats:
    read: int = 0  # frames decoded
    kept: int = 0  # frames the selection kept (queued)
    dropped: int = 0  # kept frames evicted from a full queue before the consumer took them
    reconnects: int = 0
    jumps: int = 0  # jumps of the source's timestamps, bridged (see ``LiveStream._read``)
    damaged: int = 0  # packets the decoder refused, skipped (see ``LiveStream._decoded``)


def source_kind(source: str) -> SourceKind:
    """``device`` (a camera), ``url``, ``pipe`` (standard input or a named pipe: a live stream
    that ends when its writer closes it) or ``file``."""
    if source.startswith("/dev/video") or source.startswith("v4l2:"):
        return "device"
    if _URL.match(source) and not source.startswith("file://"):
        return "url"
    if source in STDIN:
        return "pipe"
    try:
        if stat.S_ISFIFO(os.stat(source.removeprefix("file://")).st_mode):
            return "pipe"
    except (OSError, ValueError):
        pass
    return "file"


def _open(source: str, kind: SourceKind, timeout: float):
    """→ (container, video stream); one line naming the source if it cannot be opened."""
    import av

    try:
        if kind == "device":
            container = av.open(source.removeprefix("v4l2:"), format="v4l2", timeout=timeout)
        elif kind == "url":
            options = {"rw_timeout": str(int(timeout * 1e6))}  # µs: a stalled connection fails, it does not hang
            if source.startswith(("rtsp://", "rtsps://")):
                options["rtsp_transport"] = "tcp"
            container = av.open(source, options=options, timeout=timeout)
        elif kind == "pipe":  # a stream format (MPEG-TS, MKV, ...): a pipe cannot seek to an index at the end
            if source not in STDIN:
                log.info("live source %s: a named pipe, waiting for a writer", source)
            container = av.open("pipe:0" if source in STDIN else source.removeprefix("file://"))
        else:
            path = Path(source.removeprefix("file://"))
            if path.is_dir():
                raise StreamError(f"live source {source} is a folder: --live reads a video file, a URL or a camera "
                                  "device; predict a frame folder without --live")
            if not path.is_file():
                raise StreamError(f"live source {source}: no such file")
            container = av.open(str(path))
    except StreamError:
        raise
    except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
        hint = _seek_hint(source, kind)
        if kind == "device":
            hint = "; is the camera connected, and free (not used by another program)?"
        raise StreamError(f"live source {source}: cannot open it ({_reason(e)}){hint}") from e
    stream = video_stream(container)  # the one extract-features and predict read from a file
    if stream is None:
        container.close()
        raise StreamError(f"live source {source}: no video stream")
    return container, stream


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    text = re.sub(r":\s*'[^']*'$", "", text)  # PyAV appends the URL, which the message already names
    return re.sub(r"^\[Errno -?\d+\] ", "", text)  # FFmpeg's codes are no errno a user can look up


def _seek_hint(source: str, kind: SourceKind) -> str:
    if kind == "url" and source.lower().split("?")[0].endswith(_NEEDS_SEEK):
        return ("; an .mp4/.mov whose index sits at the end needs a server that answers Range requests: "
                "stream MPEG-TS (.ts), MKV or AVI, or a faststart .mp4, instead")
    if kind == "pipe":
        return "; a pipe cannot seek: send a stream format such as MPEG-TS (ffmpeg ... -f mpegts -)"
    return ""


class _Selector:
    """Frame selection on a stream, one frame at a time: rate resampling (``data.RateSampler``, as
    files are resampled), then every K-th (as ``select_indices``; ``max_frames`` needs the length)."""

    def __init__(self, sel: FrameSelection, slack: float = 0.0) -> None:
        self.rate = RateSampler(sel.fps, slack) if sel.fps else None
        self.stride = sel.stride
        self.n = 0

    def keep(self, t: float) -> bool:
        if self.rate is not None and not self.rate.keep(t):
            return False
        i, self.n = self.n, self.n + 1
        return i % self.stride == 0


class _Queue:
    """A bounded hand-over: ``put`` drops the oldest item when full (``drop``) or waits."""

    def __init__(self, size: int, drop: bool, stats: StreamStats) -> None:
        self.items: deque[StreamFrame] = deque()
        self.size, self.drop, self.stats = size, drop, stats
        self.cond = threading.Condition()
        self.finished = False

    def put(self, item: StreamFrame, stop: threading.Event) -> None:
        with self.cond:
            while not self.drop and len(self.items) >= self.size and not stop.is_set():
                self.cond.wait(0.1)
            if len(self.items) >= self.size:
                self.items.popleft()
                self.stats.dropped += 1
            self.items.append(item)
            self.cond.notify_all()

    def finish(self) -> None:
        with self.cond:
            self.finished = True
            self.cond.notify_all()

    def take(self) -> list[StreamFrame] | None:
        """Every queued frame (at least one), oldest first; None when the source is done."""
        with self.cond:
            while not self.items and not self.finished:
                self.cond.wait(0.1)  # a timeout keeps Ctrl-C responsive in the main thread
            if not self.items:
                return None
            out = list(self.items)
            self.items.clear()
            self.cond.notify_all()
            return out


class LiveStream:
    """Frames of a live source; iterate for single frames or ``batches()`` for all that are ready.

    ``drop``: None = drop when the source is live (a device, a URL, or a file with ``realtime``).
    ``retries``: with ``reconnect``, how many reopenings in a row to try (None: until closed).
    After the iteration, ``ended`` says why it stopped and ``error`` is set if the source failed.
    """

    def __init__(self, source: str, *, selection: FrameSelection | None = None, realtime: bool = False,
                 reconnect: bool = False, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 queue_size: int = 2, drop: bool | None = None, timeout: float = 10.0, retries: int | None = None,
                 backoff: float = 0.5, max_backoff: float = 10.0) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        self.source, self.kind = source, source_kind(source)
        self.selection = selection or FrameSelection()
        self.realtime, self.reconnect, self.transform = realtime, reconnect, transform
        self.timeout, self.retries, self.backoff, self.max_backoff = timeout, retries, backoff, max_backoff
        self.drop = (self.kind != "file" or realtime) if drop is None else drop
        self.stats = StreamStats()
        self.ended: str | None = None
        self.error: str | None = None
        self.fps: float | None = None
        self._queue = _Queue(queue_size, self.drop, self.stats)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: Any = None
        # The reader thread runs with one intra-op thread; close() restores the caller's count
        # (``runtime.threads_per_thread``).
        self._threads = torch.get_num_threads()
        self._omp = threads_per_thread()
        self._t_start: float | None = None  # wall clock of the stream's first frame
        self._last_time: float | None = None  # time of the last kept frame
        self._connection = -1  # the connection being read (``StreamFrame.connection``)
        if reconnect and self.kind in ENDS:
            log.warning("--reconnect has no effect on a %s: it ends where it ends", self.kind)
        if not reconnect or self.kind in ENDS:  # a missing file does not come back by retrying
            self._first = _open(source, self.kind, timeout)  # fail at once, in the caller's thread
            self.fps = _rate(self._first[1])

    # ---------------------------------------------------------------------------- consumer side

    def start(self) -> LiveStream:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="live-reader", daemon=True)
            self._thread.start()
        return self

    def batches(self) -> Iterator[list[StreamFrame]]:
        """Lists of the frames ready at each call, oldest first (at most ``queue_size``)."""
        self.start()
        while (got := self._queue.take()) is not None:
            yield got

    def __iter__(self) -> Iterator[StreamFrame]:
        for batch in self.batches():
            yield from batch

    def close(self) -> None:
        """Stop the reader (it closes the source); safe to call twice, and after an interrupt."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            if self._omp:
                torch.set_num_threads(self._threads)
        elif self._first is not None:
            self._first[0].close()
            self._first = None
        if self.ended is None:
            self.ended = "stopped"

    def __enter__(self) -> LiveStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------ reader side

    def _run(self) -> None:
        if self._omp:  # the resize in this thread must not start an OpenMP team on the model's cores
            torch.set_num_threads(1)
        attempt = 0
        try:
            while not self._stop.is_set():
                try:
                    opened, self._first = self._first, None
                    container, stream = opened or _open(self.source, self.kind, self.timeout)
                except StreamError as e:
                    if not self._retry(attempt, str(e).removeprefix(f"live source {self.source}: ")):
                        return
                    attempt += 1
                    continue
                self.fps = self.fps or _rate(stream)
                self._connection += 1
                read_before = self.stats.read
                failed, hint = False, ""
                try:
                    self._read(container, stream)
                    why = "end of file" if self.kind == "file" else "end of stream"
                    if self.kind == "file" and not self._stop.is_set() and (
                            cut := file_truncation(Path(self.source.removeprefix("file://")), self.stats.read)):
                        log.warning("%s", cut)  # as predict on the file says it: it ended early
                except Exception as e:  # noqa: BLE001 - decoders and networks fail in many ways; bound to the source
                    failed = True
                    if self.kind == "file":
                        why = f"decoding failed after {self.stats.read} frames ({_reason(e)})"
                    else:
                        hint = _seek_hint(self.source, self.kind) if self.stats.read == read_before else ""
                        why = f"lost after {self.stats.read} frames ({_reason(e)}){hint}"
                finally:
                    container.close()
                if self._stop.is_set():
                    return
                if self.kind in ENDS or not self.reconnect:
                    if not failed:
                        self.ended = why
                    else:
                        retry = "; --reconnect retries" if self.kind not in ENDS and not hint else ""
                        self.ended, self.error = "lost", f"live source {self.source}: {why}{retry}"
                    return
                attempt = 0 if self.stats.read > read_before else attempt  # frames came: a fresh backoff
                if not self._retry(attempt, why):
                    return
                attempt += 1
        except Exception as e:  # noqa: BLE001 - a bug here must end the run as an error, not as "stopped"
            log.debug("live reader failed", exc_info=True)
            self.ended, self.error = "lost", f"live source {self.source}: the reader failed ({type(e).__name__}: {e})"
        finally:
            if self._first is not None:  # stopped before the loop took the source opened up front
                self._first[0].close()
                self._first = None
            self._queue.finish()

    def _retry(self, attempt: int, why: str) -> bool:
        """Wait the backoff before reopening; False (and the loss recorded) if not to retry."""
        if self._stop.is_set():
            return False
        if not self.reconnect or (self.retries is not None and attempt >= self.retries):
            tries = f" (gave up after {attempt} reconnection attempts)" if self.reconnect else ""
            self.ended, self.error = "lost", f"live source {self.source}: {why}{tries}"
            return False
        delay = min(self.max_backoff, self.backoff * 2 ** attempt)
        log.warning("live source %s: %s; reconnecting in %.1f s", self.source, why, delay)
        self.stats.reconnects += 1
        return not self._stop.wait(delay)

    def _read(self, container, stream) -> None:
        """Decode until the end of the source or a stop. Times continue over reconnections: a new
        connection starts at the wall-clock time since the stream's first frame. Within one, a jump
        of the source's timestamps is taken as one frame period, so times keep going forward and
        the frame selection keeps its rate: back by more than a second (or two frame periods;
        joined recordings, a camera that restarts its clock), or, on a live source, ahead by more
        than ``MAX_GAP`` (or ten frame periods; a wrapped MPEG-TS clock: a real stall that long
        hits ``timeout`` first). A file's gap ahead is real time (a recording that paused) and kept."""
        stream.thread_type = "AUTO"
        selector = _Selector(self.selection,
                             rate_slack(float(stream.time_base or 0), 1 / self.fps if self.fps else None))
        period = 1.0 / (self.fps or 30.0)
        back, ahead = max(2 * period, 1.0), max(MAX_GAP, 10 * period)  # what counts as a jump (see above)
        t0: float | None = None  # source time of this connection's first frame
        wall0 = offset = 0.0
        shift, prev = 0.0, None  # added to t_src - t0 after jumps; the previous frame's time in this connection
        for frame in self._decoded(container, stream):
            if self._stop.is_set():
                return
            now = time.perf_counter()
            t_src = float(frame.time) if frame.time is not None else self.stats.read * period
            if t0 is None:
                t0, wall0 = t_src, now
                if self._t_start is None:
                    self._t_start = now
                # after a reconnection: the time since the first frame, and never before the last one
                offset = now - self._t_start
                if self._last_time is not None:
                    offset = max(offset, self._last_time + period)
            local = t_src - t0 + shift
            if prev is not None and (local < prev - back or (self.kind != "file" and local > prev + ahead)):
                (log.warning if not self.stats.jumps else log.debug)(
                    "live source %s: its timestamps jumped from %.2f s to %.2f s (joined recordings or a restarted "
                    "clock?); times go on from the last frame", self.source, prev + t0 - shift, t_src)
                self.stats.jumps += 1
                shift += prev + period - local
                local = prev + period
            prev = local
            if self.realtime:  # release the frame when its time has come
                due = wall0 + local
                if due > now and self._stop.wait(due - now):
                    return
            released = time.perf_counter()
            index = self.stats.read
            self.stats.read += 1
            if not selector.keep(local):
                continue
            rgb = frame_rgb(frame)
            image = self.transform(rgb) if self.transform is not None else rgb
            self.stats.kept += 1
            self._last_time = t = offset + max(0.0, local)
            self._queue.put(StreamFrame(image, t, index, released, self._connection), self._stop)

    def _decoded(self, container, stream) -> Iterator[Any]:
        """The source's frames, decoded packet by packet, as ffmpeg does: a damaged packet (a lost
        datagram, a bad sector) costs its frame, not the connection. ``MAX_DAMAGED`` in a row end
        it as an error (a source that decodes to nothing)."""
        import av

        run = 0
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                self.stats.damaged += 1
                run += 1
                if run >= MAX_DAMAGED:
                    raise
                (log.warning if self.stats.damaged == 1 else log.debug)(
                    "live source %s: skipped a damaged packet (%s)", self.source, _reason(e))
                continue
            run = 0
            yield from frames


def _rate(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else None
