"""Process-wide CPU settings: the tuned allocator reuses large blocks instead of faulting them in."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

PROBE = """
import json, resource, sys, torch
sys.path.insert(0, sys.argv[1])
from pipeline.runtime import tune_cpu_allocator
tuned = tune_cpu_allocator() if sys.argv[2] != "default" else False
if sys.argv[2] == "ask":  # only whether it tuned
    print(json.dumps({"tuned": tuned}))
    sys.exit()
from pipeline.backbones import create_backbone

# Activations above 32 MiB (8 x 96 x 112 x 112 floats = 38.5 MB): glibc's default threshold adapts to
# freed blocks only up to 32 MiB, so at a smaller input it sometimes reuses them without any tuning.
model, x = create_backbone("mobilenet_v2", "none").net.eval(), torch.randn(8, 3, 224, 224)

def faults_of_one_forward():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    with torch.inference_mode():
        model(x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

for _ in range(2):  # the first times, the pages have to come from the kernel either way
    faults_of_one_forward()
print(json.dumps({"tuned": tuned, "again": [faults_of_one_forward() for _ in range(3)]}))
"""


def _probe(mode: str, **env: str) -> subprocess.Popen:
    """Started, not awaited: the probes run side by side (a page fault count is per process)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    return subprocess.Popen([sys.executable, "-c", PROBE, str(REPO), mode], stdout=subprocess.PIPE, text=True,
                            env={**clean, "OMP_NUM_THREADS": "1", **env})


def _result(probe: subprocess.Popen) -> dict:
    out, _ = probe.communicate(timeout=300)
    assert probe.returncode == 0
    return json.loads(out)


@pytest.mark.skipif(not sys.platform.startswith("linux") or not (os.confstr("CS_GNU_LIBC_VERSION") or "")
                    .startswith("glibc"), reason="the mallopt thresholds are glibc's")
def test_tuned_allocator_reuses_large_blocks():
    probes = _probe("default"), _probe("tune"), _probe("ask", MALLOC_ARENA_MAX="2")
    try:
        default, tuned, chosen = map(_result, probes)
    finally:
        for probe in probes:
            probe.kill()
    assert not default["tuned"] and tuned["tuned"]
    # glibc's default: the large activations are fresh mmaps, faulted in again on every forward
    assert min(default["again"]) > 2000, default  # 31,000-82,000 measured (4 KiB pages)
    # tuned: the freed blocks are reused, hardly a page is faulted in again
    assert sorted(tuned["again"])[1] < 200, tuned  # 0 measured
    # malloc settings the user chose (e.g. for jemalloc/tcmalloc) are left alone
    assert not chosen["tuned"]


def test_tune_is_idempotent():
    from pipeline.runtime import tune_cpu_allocator

    assert tune_cpu_allocator() == tune_cpu_allocator()


@pytest.mark.parametrize("major, hip, want", [(7, None, "float16"), (8, None, "bfloat16"), (9, None, "bfloat16"),
                                              (7, "6.2", "bfloat16")])
def test_auto_precision_takes_bf16_only_where_the_gpu_computes_it(monkeypatch, major, hip, want):
    """torch.cuda.is_bf16_supported() says yes on a V100 or T4 too (emulated bf16, slower than fp32
    there), so `--precision auto` never fell back to fp16 on them."""
    import types

    import torch

    from pipeline.runtime import resolve_precision

    asked = []
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: asked.append(d) or types.SimpleNamespace(major=major, minor=0))
    dev = torch.device("cuda", 1)
    assert resolve_precision("auto", dev) == getattr(torch, want)
    assert asked in ([dev], [])  # this device's own properties (ROCm: every arch it runs has bf16)
