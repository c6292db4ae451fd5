"""Crash-safe file writes, the one way every module writes a file that must never be half-written.

A file is written to ``<name>.tmp`` beside its target, flushed to disk, then atomically renamed over
the target: a kill at any instant leaves the old file or the new one, never a torn one. If writing
fails, the temporary file is removed (a full disk must not stay full because of it), and a full
disk becomes one ``DiskFullError`` line naming the file instead of a cascade of library errors.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import io
import logging
import os
import secrets
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import PipelineError

log = logging.getLogger(__name__)


class DiskFullError(PipelineError):
    """No space (or quota) left while writing a file."""


class NotWritableError(PipelineError):
    """An output path that cannot be written (its parent is a file, no permission, ...)."""


class OutputInUseError(PipelineError):
    """Another process is writing the same output."""


_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", "errno = 28", "errno = 122")


def is_disk_full(e: BaseException) -> bool:
    """True for ENOSPC/EDQUOT, also where a library (h5py, torch's zip writer) only says so in text."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in _FULL:
            return True
        if any(t in str(e) for t in _FULL_TEXT):
            return True
        e = e.__cause__ or e.__context__  # type: ignore[assignment]
    return False


def disk_full(path: str | Path, hint: str = "") -> DiskFullError:
    return DiskFullError(f"no space left on device while writing {path}; {hint + '; ' if hint else ''}"
                         "free space and rerun")


def not_regular(path: str | Path) -> str:
    """What ``path`` is where it exists and is neither a regular file nor a folder (following
    symlinks): 'a device', 'a FIFO', 'a socket'; '' otherwise. Opening one to read could block (a
    FIFO) or read another thing than a file; writing one would replace it."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return ""
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else ""


@contextlib.contextmanager
def atomic_path(path: str | Path, *, hint: str | Callable[[], str] = "", fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it is fsynced and
    renamed over ``path``, on any failure removed. ``hint`` (or a function giving it, called only
    on failure) is added to a full-disk message: what is kept, what to rerun. ``fsync=False`` for
    files whose reader checks them anyway (a part torn by a power cut is redone): the rename
    still makes them all-or-nothing for a killed process."""
    path = Path(path)
    if what := not_regular(path):  # a rename would replace a device or FIFO (as root, /dev/null) with a file
        raise NotWritableError(f"{path} exists and is not a regular file ({what}); give a file name")
    tmp = temporary_of(path)
    if tmp.is_dir() and not tmp.is_symlink():
        raise NotWritableError(f"{tmp} is a folder, in the way of the temporary file {path} is written through; "
                               "move it away and rerun")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())  # the rename must not outrun the data (power loss)
        _keep_mode(path, tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync_dir(path.parent)  # and the rename itself: after a power cut, the new file, not the old
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if not isinstance(e, DiskFullError) and is_disk_full(e):
            raise disk_full(path, hint() if callable(hint) else hint) from None
        if (isinstance(e, OSError) and e.errno in (errno.EPERM, errno.EACCES, errno.EROFS)
                and {e.filename, e.filename2} & {str(tmp), str(path)}):  # this file's, not one read meanwhile
            h = hint() if callable(hint) else hint
            raise NotWritableError(f"cannot write {path}: {e.strerror}; {h + '; ' if h else ''}make it and its "
                                   "folder writable (a file another user owns in a sticky folder such as /tmp "
                                   "cannot be replaced), or choose another path") from None
        raise


def _keep_mode(path: Path, tmp: Path) -> None:
    """Give ``tmp`` the permission bits of the ``path`` it replaces, as ``cp`` over a file does: a
    cache a lab shares as 0664 stays writable by its group, a read-only one stays read-only. A new
    file keeps the umask's mode; where bits cannot be set (a file system without them), nothing."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename in it) to disk. Where folders cannot be opened (Windows),
    or the file system does not support it, nothing."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_of(path: str | Path) -> Path:
    """``<path>.tmp``: the temporary file ``atomic_path`` writes ``path`` through."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def remove_stale_tmp(path: str | Path) -> None:
    """Remove ``temporary_of(path)`` where a killed writer left it. Only under ``exclusive(path)``:
    no writer is running then."""
    tmp = temporary_of(path)
    if tmp.is_file() and not tmp.is_symlink():
        log.info("removing %s, left by an interrupted write", tmp)
        with contextlib.suppress(OSError):
            tmp.unlink()


def remove_tree(path: str | Path, *, aside: str | Path | None = None, strict: bool = True) -> None:
    """Remove the folder ``path`` so that an interruption leaves it whole or gone: first renamed
    to ``<aside>.removing-<random>`` beside ``aside`` (default: ``path`` itself), one atomic step,
    then deleted. ``shutil.rmtree`` alone, stopped half-way, leaves a folder with some of its
    files, which a later run may take for whole (finished parts without the meta.json that says
    what made them). ``remove_removing(aside)`` clears what an interruption left aside. A folder
    that cannot be renamed (a mount point) or is a link (to a scratch disk) is emptied in place;
    ``strict``: a failure there is one line."""
    path = Path(path)
    if path.is_symlink():  # renaming would move the link and leave what it points to
        _empty(path, strict)
        return
    if not path.exists():
        return
    base = Path(aside) if aside is not None else path
    trash = base.with_name(f"{base.name}.removing-{secrets.token_hex(4)}")
    try:
        os.rename(path, trash)
    except OSError:  # a mount point (EBUSY), or no right to rename
        _empty(path, strict)
        return
    shutil.rmtree(trash, ignore_errors=True)  # what stays is out of the way: remove_removing clears it


def _empty(folder: Path, strict: bool) -> None:
    """Delete what ``folder`` holds, keeping the folder. Not atomic: stopped half-way, it can leave
    parts without their meta.json, which ``CacheWriter`` then redoes rather than adopts."""
    try:
        for child in list(folder.iterdir()):
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    except OSError as e:
        if strict:
            raise NotWritableError(f"cannot delete what {folder} holds ({e.strerror or e}); delete it by hand "
                                   "and rerun") from None


def remove_removing(aside: str | Path) -> None:
    """Delete the folders ``remove_tree(..., aside=aside)`` renamed but was stopped from deleting.
    Only under the lock of what ``aside`` belongs to: no one else is removing them then."""
    aside = Path(aside)
    for t in aside.parent.glob(glob.escape(aside.name) + ".removing-*"):
        if t.is_dir() and not t.is_symlink():
            log.info("removing %s, left by an interrupted removal", t)
            shutil.rmtree(t, ignore_errors=True)


def atomic_write_bytes(path: str | Path, data: bytes, *, hint: str = "") -> None:
    with atomic_path(path, hint=hint) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | Path, text: str, *, hint: str = "") -> None:
    atomic_write_bytes(path, text.encode(), hint=hint)


def atomic_torch_save(path: str | Path, obj: Any, *, hint: str = "") -> None:
    """``torch.save`` through memory, so a full disk is an ordinary ``OSError`` of a plain write (torch's
    own zip writer reports it as an opaque ``RuntimeError`` from C++)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getbuffer(), hint=hint)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_dir(path: str | Path, what: str) -> Path:
    """Create the folder ``path`` (and parents) and check it is writable; one line if not.

    ``what`` names the option, e.g. ``"--out"``."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                raise NotWritableError(f"cannot use {what} {path}: {p} is a file, not a folder; choose another path")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if is_disk_full(e):
            raise disk_full(path) from None
        raise NotWritableError(f"cannot write to {what} {path} ({e.strerror or e}); choose another path") from e
    return path


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold ``path`` for this process while it writes there: a run folder by locking the folder
    itself, a file (a feature cache) by ``<path>.lock`` beside it, with this process's pid, removed
    afterwards. A second process on the same output gets one line instead of a race over the same
    temporary files (whose loser crashed, and whose winner could be left with the other's files).

    An advisory ``flock``: released by the kernel however the holder ends (a kill included), so a
    lock is never left stale; a lock file a killed run left is taken over, another user's too.
    Where ``fcntl`` is missing (Windows) nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path = Path(path)
    folder = path.is_dir()
    lock = path if folder else path.with_name(path.name + ".lock")
    while True:
        theirs = False  # a lock file another user's run left (killed): ours to read and lock, not to write
        try:
            try:
                fd = os.open(lock, os.O_RDONLY if folder else os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:
                if folder:
                    raise
                fd, theirs = os.open(lock, os.O_RDONLY), True
        except OSError as e:
            raise NotWritableError(f"cannot use {what} {path}: {lock}: {e.strerror or e}; choose another path") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # EWOULDBLOCK: held
            holder = "" if folder else os.pread(fd, 256, 0).decode(errors="replace").strip()
            os.close(fd)
            pid, _, host = holder.partition("@")
            who = f" (pid {pid}{' on ' + host if host else ''})" if pid.isdigit() else ""
            raise OutputInUseError(f"{what} {path} is in use by another process{who}: "
                                   f"wait for it to finish, or choose another {what}") from None
        except OSError as e:  # no flock here (Lustre without -o flock, some FUSE and NFS mounts): run unlocked
            os.close(fd)
            if not folder:
                with contextlib.suppress(OSError):
                    os.unlink(lock)
            log.warning("cannot lock %s %s on this filesystem (%s): another run on it is not prevented",
                        what, path, e.strerror or e)
            yield
            return
        if theirs:  # locked it: no run holds it, a stale file; make our own in its place
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)
            continue
        if folder or _same_file(fd, lock):
            break
        os.close(fd)  # the holder removed this lock file as it finished: take the one there now
    try:
        if not folder:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}".encode(), 0)  # a shared filesystem: which host
        yield
    finally:
        if not folder:
            with contextlib.suppress(OSError):
                os.unlink(lock)  # still held: a process that opened it meanwhile sees it gone and retries
        os.close(fd)


def in_use(folder: str | Path) -> bool:
    """Whether a run holds ``folder`` (see ``exclusive``) right now."""
    try:
        import fcntl

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError as e:
        return isinstance(e, BlockingIOError)
    finally:
        os.close(fd)  # also releases the probe's lock


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False
