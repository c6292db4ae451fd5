"""Process-wide settings: device and precision resolution, worker counts, and the CPU allocator.

The allocator. 
glibc serves every allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
unmaps it again on ``free``. A MobileNetV2 forward at batch 64 allocates activations of up to
~300 MB, so on every forward the kernel hands out and zero-fills all those pages again: measured
on this project's 2-core CPU machine, that page faulting took half of the forward pass (76 → 150
frames/s once it was gone). ``tune_cpu_allocator`` raises glibc's mmap and trim thresholds so freed
blocks stay in the heap and the next batch reuses them. The cost is that the process keeps its peak
heap until it exits, which is what a long extraction wants anyway. Elsewhere (macOS, Windows, musl)
it does nothing. Python callers of the library can call it themselves; it is idempotent.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI applies the allocator before it loads
    import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
_INT_MAX = 2**31 - 1
_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep large freed blocks in glibc's heap for reuse. True if applied (Linux with glibc).

    Left alone when the user already chose malloc settings (``MALLOC_*_`` variables or
    ``GLIBC_TUNABLES``), e.g. to preload jemalloc or tcmalloc instead.
    """
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
    except (ValueError, OSError, AttributeError):  # not glibc, or no confstr (Windows)
        return False
    if any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        log.debug("malloc settings given in the environment; leaving them alone")
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        # Older glibc caps the mmap threshold at 32 MiB (HEAP_MAX_SIZE / 2); take the largest it allows.
        mmap_ok = any(libc.mallopt(_M_MMAP_THRESHOLD, v) == 1 for v in (_INT_MAX, 32 << 20))
        _tuned = mmap_ok and libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    except (OSError, AttributeError):
        return False
    log.debug("glibc malloc thresholds %s", "raised" if _tuned else "refused; keeping the defaults")
    return _tuned


# ------------------------------------------------------------------------- device and precision


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"unknown --device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype, or None for plain fp32. ``auto``: bf16 where the GPU computes it natively
    (Ampere and later, ROCm), else fp16; fp32 on CPU."""
    import torch

    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if native_bf16(device) else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("--precision fp16 is for CUDA; on CPU use fp32 or bf16")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 tensor cores. Not ``torch.cuda.is_bf16_supported()``: since torch
    2.3 it is also true where bf16 is only emulated (a V100 or T4, compute capability 7), which runs
    slower than fp32 there, and it asks the current device rather than this one."""
    import torch

    return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8


def training_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for training (train-temporal, sweep, finetune-end-to-end): as
    ``resolve_precision`` on CUDA; fp32 on CPU, saying so where bf16 or fp16 was asked for (it was
    dropped without a word, and the checkpoint recorded float32)."""
    if device.type == "cuda":
        return resolve_precision(precision, device)
    if precision not in ("auto", "fp32"):
        log.warning("--precision %s is for CUDA: training on %s runs in fp32", precision, device.type)
    return None


def default_worker_processes() -> int:
    """DataLoader worker processes: every core but the main process's, at most 8."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def default_workers(device: torch.device) -> int:
    """Frame decoders: on CPU one thread per core the model uses (they take turns with it, see
    ``InlineFrameLoader``); on CUDA, worker processes that decode while the GPU computes."""
    import torch

    return torch.get_num_threads() if device.type == "cpu" else default_worker_processes()


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` for ``dtype`` on ``device``; nothing for plain fp32 (None)."""
    import torch

    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` here ("cpu", "cuda"); torch before 2.4 has no
    device argument, only the CUDA and CPU queries."""
    import torch

    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


# ------------------------------------------------------------------------------------ memory


def available_memory() -> int | None:
    """Bytes of RAM a new allocation can get without swapping: ``MemAvailable`` of /proc/meminfo
    (free memory plus what the page cache can give back), else free pages from ``sysconf``; None
    where neither is known. psutil is not a dependency."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@functools.lru_cache(maxsize=1)
def threads_per_thread() -> bool:
    """Whether torch's intra-op thread count is per thread (OpenMP): a helper thread can then set
    its own to 1 without touching the model's, though threads started later inherit the last
    value, so the caller's count must be restored afterwards. Other backends share one pool."""
    import torch

    return "parallel backend: OpenMP" in torch.__config__.parallel_info()
