"""The table ``bench/gpu.sh`` ends with: each step's status and time, then each bench's numbers.

    python bench/gpu_table.py STEPS.tsv BENCH.jsonl DEVICE_LINE TOTAL_SECONDS
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

UNITS = {"clips_per_s": "clips/s", "fps": "frames/s", "_s": "s", "mib": "MiB"}  # longest suffix first


def fmt(k: str, v) -> str:
    if isinstance(v, float):
        v = f"{v:.3f}" if k == "ratio" or abs(v) < 10 else f"{v:.1f}"
    unit = next((u for suffix, u in UNITS.items() if k.endswith(suffix)), "")
    return f"{k} {v}{' ' + unit if unit else ''}"


def main() -> None:
    steps, jsonl, device, total = sys.argv[1:5]
    print(f"\n### bench/gpu.sh: {device}; {total} s in all\n")
    print("| step | status | seconds |\n|---|---|---|")
    for line in Path(steps).read_text().splitlines():
        name, status, secs = (line.split("\t") + ["", ""])[:3]
        print(f"| {name} | {status} | {secs} |")
    rows = [json.loads(x) for x in Path(jsonl).read_text().splitlines() if x.strip()] if Path(jsonl).exists() else []
    if rows:
        print("\n| bench | results |\n|---|---|")
        for r in rows:
            name = r.pop("bench")
            print(f"| {name} | {'; '.join(fmt(k, v) for k, v in r.items())} |")


if __name__ == "__main__":
    main()
