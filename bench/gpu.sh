#!/usr/bin/env bash
# One prepared measurement on a lent GPU, in at most 9 minutes, ending with one table.
#
#   bash bench/gpu.sh                 # on the GPU machine (from the repository root or anywhere)
#   bash bench/gpu.sh --fetch-wheels  # here, before: download what the GPU machine lacks into .whl/
#
# On a machine without CUDA it prints one line and exits 0. With CUDA it runs, each step under its
# own time limit and all of them inside the budget (GPU_BUDGET_S, default 540 s), most important first:
#   1. the CUDA tests (tests/test_cuda.py: extraction vs CPU, AMP training, fine-tuning, predict);
#   2. extraction against the bare backbone (bench/extract.py, bf16, channels_last) for MobileNetV2,
#      MobileNetV3-Large, ResNet-50 and EfficientNet-B0;
#   3. the CLI with --device cuda on generated data: make-demo-data, extract-features,
#      train-temporal, finetune-end-to-end with AMP, predict;
#   4. the other benches with --device cuda: end-to-end fine-tuning, stage two with the split in GPU
#      memory and read lazily, the sweep, predict, and onnxruntime (its CUDA provider when
#      installed: onnxruntime-gpu; else the CPU one); extraction again with more decoders; the
#      host's CPU per frame on the way to the GPU (bench/host_cost.py);
#   5. the rest of the test suite with the GPU visible, on what budget is left;
# then prints one table: frames/s and ratios, epoch seconds, peak GPU memory, and each step's status.
# The table, the bench records and logs.tar.gz (one log per step) go to $GPU_OUT (default $OUT when
# the device tool runs it, else bench/out/gpu): few files, as the device tool brings back at most 8.
# The device machine has no registry: PyAV and simplejpeg travel as wheels in .whl/ (see --fetch-wheels).
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)   # the budget counts from here, the wheels' install and the checks included
BUDGET=${GPU_BUDGET_S:-540}
DEVICE=${GPU_SH_DEVICE:-cuda}   # GPU_SH_DEVICE=cpu runs the same plumbing on a CPU (a dry run, small sizes)

if [ "${1:-}" = "--fetch-wheels" ]; then
  # The device image has Python 3.12 with torch, torchvision, h5py, click, tqdm, matplotlib, timm,
  # onnx and onnxruntime; PyAV (video decoding) and simplejpeg (JPEG frames) are missing there.
  mkdir -p .whl && { grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "av>=12" "simplejpeg>=1.7"
  ls .whl
  exit $?
fi

if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch' 2>/dev/null; then PY=${PYTHON:-.venv/bin/python}
else PY=${PYTHON:-python3}; fi

if [ "$DEVICE" = cuda ] && ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "bench/gpu.sh: no CUDA GPU visible to $PY (torch.cuda.is_available() is False or torch is missing); nothing to measure"
  exit 0
fi

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_site .whl/*.whl \
    && export PYTHONPATH=/tmp/gpu_site${PYTHONPATH:+:$PYTHONPATH}
fi
missing=$("$PY" - <<'EOF'
import importlib.util
print(" ".join(m for m in ("torch", "torchvision", "av", "h5py", "click", "tqdm", "matplotlib", "PIL", "pytest", "simplejpeg")
               if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
  echo "bench/gpu.sh: missing Python packages: $missing; run 'bash bench/gpu.sh --fetch-wheels' where pip works and carry .whl"
  exit 1
fi

OUTDIR=${GPU_OUT:-${OUT:-bench/out/gpu}}
mkdir -p "$OUTDIR"
export BENCH_JSON="$OUTDIR/bench.jsonl" PYTHONUNBUFFERED=1
: > "$BENCH_JSON"
STEPS="$OUTDIR/steps.tsv"
: > "$STEPS"
WORK=$(mktemp -d /tmp/gpu_sh.XXXXXX)
LOGS="$WORK/logs"; mkdir -p "$LOGS"
# the logs come back in one archive also when the run is cut short (a kill from outside)
trap 'tar -czf "$OUTDIR/logs.tar.gz" -C "$WORK" logs 2>/dev/null; rm -rf "$WORK"' EXIT

# step NAME LIMIT_S COMMAND...: run under a time limit that also fits the remaining budget.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 15 ))   # 15 s kept for the table
  if [ "$left" -lt 20 ]; then printf '%s\tskipped (budget)\t0\n' "$name" >> "$STEPS"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s.%N) rc
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$LOGS/$name.log" 2>&1; rc=$?
  local secs; secs=$(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')" 2>/dev/null || echo "?")
  case $rc in 0) st=ok ;; 124|137) st="TIMEOUT" ;; *) st="FAIL rc=$rc" ;; esac
  printf '%s\t%s\t%s\n' "$name" "$st" "$secs" >> "$STEPS"
  tail -n "$([ "$st" = ok ] && echo 3 || echo 30)" "$LOGS/$name.log"
}

"$PY" - > "$OUTDIR/device.txt" 2>&1 <<'EOF'
import torch, torchvision
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
      + (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs" if p else "no GPU"))
EOF
cat "$OUTDIR/device.txt"

cli_steps() {
  local D="$WORK/demo" F="$WORK/demo.h5" CLI=("$PY" cli.py -q)
  step cli_make_demo_data 60 "${CLI[@]}" make-demo-data "$D"
  step cli_extract 90 "${CLI[@]}" extract-features --data-dir "$D" -o "$F" --weights none --size 112 \
    --device "$DEVICE" --no-progress
  step cli_train_temporal 60 "${CLI[@]}" train-temporal --cache "$F" --out "$WORK/s2" --epochs 20 --hidden 256 \
    --device "$DEVICE" --no-progress
  step cli_finetune_amp 120 "${CLI[@]}" finetune-end-to-end --data-dir "$D" --init "$WORK/s2/best.pt" \
    --out "$WORK/e2e" --epochs 2 --trainable-blocks 4 --device "$DEVICE" \
    $([ "$DEVICE" = cuda ] && echo --precision bf16) --no-progress
  step cli_predict 60 "${CLI[@]}" predict "$WORK/e2e/best.pt" "$D/test" --window 8 --json --device "$DEVICE" \
    --no-progress
}

if [ "$DEVICE" != cuda ]; then  # dry run of the plumbing on a CPU: small sizes, no tests
  cli_steps
  for b in mobilenet_v2 resnet50; do
    step "bench_extract_$b" 120 "$PY" bench/extract.py --backbone $b --device "$DEVICE" --frames 128 --repeats 1 \
      --size 64 --keep "$WORK/extract_data"
  done
  step bench_temporal 120 "$PY" bench/temporal.py --device "$DEVICE" --train 64 --val 32 --frames 30 --epochs 1 \
    --big-gb 0 --lazy-pairs 1 --lockstep 1
  step bench_export 120 "$PY" bench/export.py --device "$DEVICE" --repeats 1 --batches 1 --live-seconds 2
  step bench_sweep 120 "$PY" bench/sweep.py --device "$DEVICE" --train 96 --val 48 --frames 30 --epochs 2
  step bench_predict 120 "$PY" bench/predict.py --device "$DEVICE" --seconds 4
  step bench_finetune 120 "$PY" bench/finetune.py --device "$DEVICE" --videos 8 --frames 8 --size 64
  step bench_host_cost 60 "$PY" bench/host_cost.py --frames 256 --repeats 1
else
  # Most important first: a step that finds its budget spent is listed as skipped.
  step tests_cuda 120 "$PY" -m pytest -q -x -p no:cacheprovider tests/test_cuda.py
  # Extraction against the bare backbone, bf16 autocast and channels_last, decoding in DataLoader
  # worker processes; the four backbones of issue 11 on one generated dataset (written once).
  for b in mobilenet_v2 mobilenet_v3_large resnet50 efficientnet_b0; do
    step "bench_extract_$b" 70 "$PY" bench/extract.py --backbone $b --device cuda --precision bf16 --frames 24576 \
      --batch-size 256 --repeats 3 --keep "$WORK/extract_data"
  done
  cli_steps
  step bench_finetune 60 "$PY" bench/finetune.py --device cuda --videos 96
  # the split held in GPU memory, then read lazily (no 8 GB cache: the lazy-RSS check is the CPU's)
  step bench_temporal 75 "$PY" bench/temporal.py --device cuda --big-gb 0 --lazy-pairs 2 --lockstep 2
  step bench_sweep 75 "$PY" bench/sweep.py --device cuda
  step bench_predict 45 "$PY" bench/predict.py --device cuda
  if "$PY" -c 'import sys, onnxruntime as o; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
    step bench_export_cuda 60 "$PY" bench/export.py --device cuda --repeats 3
  else
    step bench_export_cpu 60 "$PY" bench/export.py --repeats 3 --live-seconds 0  # onnxruntime has no CUDA provider here
  fi
  # is decoding the limit? the same extraction with every core but one decoding (default: at most 8)
  step bench_extract_mobilenet_v2_workers 50 "$PY" bench/extract.py --device cuda --precision bf16 --frames 24576 \
    --batch-size 256 --repeats 3 --keep "$WORK/extract_data" --workers $(( $(nproc) - 1 ))
  step bench_host_cost 40 "$PY" bench/host_cost.py  # the main process's CPU per frame on this host
  # the rest of the suite with the GPU visible, on what budget is left (several processes where
  # pytest-xdist is installed)
  XDIST=(); "$PY" -c 'import xdist' 2>/dev/null && XDIST=(-n 8)
  OMP_NUM_THREADS=2 step tests_all 300 "$PY" -m pytest -q -p no:cacheprovider -m "not cuda" ${XDIST[@]+"${XDIST[@]}"}
fi

"$PY" bench/gpu_table.py "$STEPS" "$BENCH_JSON" "$(cat "$OUTDIR/device.txt")" "$(( $(date +%s) - START ))" \
  | tee "$OUTDIR/table.md"
! grep -qv $'\tok\t' "$STEPS"   # exit 0 only when every step passed
