#!/usr/bin/env bash
# fxsurgeon GPU check: one command on a GPU machine — gpu-marked tests, then the original-vs-converted table.
#
# Run from anywhere (it cd's to the repository root):
#
#     bash benchmarks/gpu_check.sh
#
# The machine needs python3 with torch (CUDA), torchvision and timm, and nothing from the network. fxsurgeon
# runs from src/ (PYTHONPATH), not installed. Its other needs travel as wheels in .whl/ at the repository root,
# built on a machine with PyPI access (all pure-Python; --no-deps, so each is named):
#
#     pip wheel --no-deps -w .whl fvcore iopath yacs termcolor tensorly tabulate portalocker
#
#   fvcore       MAC counts (the MACs column; everything else runs without it)
#   iopath yacs termcolor tabulate portalocker   fvcore's own imports (tabulate and portalocker are usually
#                there already; pyyaml, tqdm, numpy and Pillow, its other needs, come with timm/torchvision)
#   tensorly     the CP separable form (needs scipy, which the GPU image has)
# pytest, pyyaml and safetensors must be present (they are on images with timm and a test toolchain).
#
# What it does, in at most FXSURGEON_GPU_CHECK_BUDGET_S seconds (default 450: under 8 minutes with margin):
#   1. installs .whl/*.whl into /tmp/site and puts /tmp/site and src on PYTHONPATH;
#   2. prints the GPU (nvidia-smi and torch.cuda.get_device_name) and checks every import it needs;
#   3. runs the tests marked `gpu` (pytest -m gpu) under `timeout`;
#   4. runs benchmarks/gpu_bench.py: timm resnet50, efficientnet_b0, convnext_tiny, densenet121 at batch 1
#      and 64, fp32 and bf16, channels_last; eager, latency-aware and torch.compile'd — in that priority,
#      each configuration skipped (and recorded as skipped) when its estimated time would overrun the budget;
#   5. runs benchmarks/latency_budget.py in the time kept back for it (FXSURGEON_GPU_CHECK_LATENCY_S): asked vs
#      measured latency ratio of target_latency conversions, rows skipped when they would pass the deadline.
# Output goes to $OUT (./gpu_out when OUT is unset): gpu_bench.md (the table for the README), gpu_bench.json,
# pytest_gpu.log, gpu_bench.log, environment.txt. Exit status: 0 all good; 1 a test or configuration failed
# (the table is still written); 2 something needed is missing (said in one line, before any long step).
#
# Environment knobs:
#   FXSURGEON_GPU_CHECK_DEVICE=cpu   tiny CPU rehearsal of the same logic (one small model, batch 1, 64×64)
#   FXSURGEON_GPU_CHECK_BUDGET_S     total seconds for the whole script (default 450 on CUDA, 1500 on CPU)
#   FXSURGEON_GPU_CHECK_PYTEST_S     seconds allowed for the gpu tests (default 200)
#   FXSURGEON_GPU_CHECK_SKIP_TESTS=1 benchmarks only (e.g. a second run on a warm machine)
#   FXSURGEON_GPU_CHECK_MODES        benchmark phases in priority order (default eager,latency-aware,compiled;
#                                    e.g. "compiled" alone for a second run that fills in compiled rows)
#   FXSURGEON_GPU_CHECK_LATENCY_S    seconds kept back from step 4 for step 5, the latency budget
#                                    (benchmarks/latency_budget.py: resnet50, target_latency 0.7, bf16, batch 1
#                                    and 64, eager and compiled; default 150, 0 skips it)
#   PYTHON                           interpreter (default python3)
set -euo pipefail

START=$(date +%s)
DEVICE=${FXSURGEON_GPU_CHECK_DEVICE:-cuda}
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-./gpu_out}
if [ "$DEVICE" = cpu ]; then BUDGET_S=${FXSURGEON_GPU_CHECK_BUDGET_S:-1500}; else BUDGET_S=${FXSURGEON_GPU_CHECK_BUDGET_S:-450}; fi
PYTEST_S=${FXSURGEON_GPU_CHECK_PYTEST_S:-200}
MODES=${FXSURGEON_GPU_CHECK_MODES:-eager,latency-aware,compiled}
LATENCY_S=${FXSURGEON_GPU_CHECK_LATENCY_S:-150}
case "$LATENCY_S" in ''|*[!0-9]*) echo "gpu_check: FAILED: FXSURGEON_GPU_CHECK_LATENCY_S must be a number of seconds" >&2; exit 2;; esac
export PYTHONUNBUFFERED=1

cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)

log() { echo "gpu_check [$(( $(date +%s) - START ))s]: $*"; }
die() { echo "gpu_check: FAILED: $*" >&2; exit 2; }

case "$DEVICE" in cuda|cpu) ;; *) die "FXSURGEON_GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'";; esac
command -v "$PY" >/dev/null 2>&1 || die "no '$PY' on PATH (set PYTHON=/path/to/python3)"
command -v timeout >/dev/null 2>&1 || die "no 'timeout' command (coreutils) on PATH"
[ -f src/fxsurgeon/__init__.py ] || die "run from an fxsurgeon checkout: src/fxsurgeon is missing in $(pwd)"

# 1. carried wheels ---------------------------------------------------------------------------------------
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || die "pip could not install .whl/*.whl into /tmp/site (see the pip output above)"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
else
  log "WARNING: no .whl/*.whl here: fvcore's MAC counts will read n/a (build the wheels as the header says)"
fi

# 2. GPU and imports --------------------------------------------------------------------------------------
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "device mode: $DEVICE"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  else
    echo "nvidia-smi: not on PATH"
  fi
} | tee "$OUT_DIR/environment.txt"
if [ "$DEVICE" = cuda ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  log "WARNING: nvidia-smi is not on PATH; torch's view of the GPU follows"
fi
if ! FXS_DEVICE=$DEVICE "$PY" - <<'EOF' 2>&1 | tee -a "$OUT_DIR/environment.txt"; then
import importlib, os, sys
device = os.environ["FXS_DEVICE"]
missing = []
for name in ("torch", "torchvision", "timm", "pytest", "yaml", "safetensors", "fxsurgeon"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:12s} {getattr(mod, '__version__', '?'):24s} {getattr(mod, '__file__', '')}")
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
for name in ("fvcore", "tensorly"):
    try:
        mod = importlib.import_module(name)
        print(f"{name:12s} {getattr(mod, '__version__', '?'):24s} {getattr(mod, '__file__', '')}")
    except Exception as exc:
        print(f"{name:12s} NOT AVAILABLE ({type(exc).__name__}: {exc})")
if missing:
    print("gpu_check: FAILED: cannot import " + "; ".join(missing), file=sys.stderr)
    sys.exit(2)
import torch
print(f"python {sys.version.split()[0]}; torch CUDA build {torch.version.cuda}; cuda available {torch.cuda.is_available()}")
if device == "cuda":
    if not torch.cuda.is_available():
        print("gpu_check: FAILED: torch.cuda.is_available() is False (no GPU, or a CPU-only torch)", file=sys.stderr)
        sys.exit(2)
    print(f"GPU: {torch.cuda.get_device_name(0)}; {torch.cuda.device_count()} device(s); cuDNN {torch.backends.cudnn.version()}")
EOF
  die "environment check failed (see above)"
fi

# 3. gpu-marked tests -------------------------------------------------------------------------------------
mapfile -t GPU_TESTS < <(grep -lE 'pytest\.mark\.gpu' tests/test_*.py || true)
[ "${#GPU_TESTS[@]}" -gt 0 ] || die "no test file under tests/ carries pytest.mark.gpu"
if [ -n "${FXSURGEON_GPU_CHECK_SKIP_TESTS:-}" ]; then
  log "gpu tests skipped (FXSURGEON_GPU_CHECK_SKIP_TESTS is set)"
  echo "skipped by FXSURGEON_GPU_CHECK_SKIP_TESTS" >"$OUT_DIR/pytest_gpu.log"
  TEST_RC=0
else
  log "gpu tests (${GPU_TESTS[*]}), at most ${PYTEST_S}s; log: $OUT_DIR/pytest_gpu.log"
  set +e
  # output to a file, not a pipe: compile workers outliving a killed run must not hold a pipe (and us) open
  timeout --signal=INT --kill-after=15 "$PYTEST_S" "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" \
    >"$OUT_DIR/pytest_gpu.log" 2>&1
  TEST_RC=$?
  set -e
  tail -n 40 "$OUT_DIR/pytest_gpu.log"
fi
case $TEST_RC in
  0) log "gpu tests passed" ;;
  124|130|137) log "GPU TESTS TIMED OUT after ${PYTEST_S}s (rc=$TEST_RC)" ;;
  5) log "GPU TESTS: none ran (rc=5)" ;;
  *) log "GPU TESTS FAILED (rc=$TEST_RC)" ;;
esac
if [ "$DEVICE" = cpu ] && [ "$TEST_RC" -eq 5 ]; then TEST_RC=0; fi  # rehearsal: gpu tests skip without CUDA

# 4. benchmark table --------------------------------------------------------------------------------------
FINAL_DEADLINE=$(( START + BUDGET_S - 20 ))  # 20 s for writing the table and ending
DEADLINE=$(( FINAL_DEADLINE - LATENCY_S ))   # step 5's share is kept back
LEFT=$(( DEADLINE - $(date +%s) ))
if [ "$LEFT" -lt 30 ]; then
  log "BENCHMARKS NOT RUN: only ${LEFT}s left of the ${BUDGET_S}s budget"
  exit 1
fi
if [ "$DEVICE" = cpu ]; then
  BENCH_ARGS=(--device cpu --models resnet10t --batch-sizes 1 --dtypes fp32,bf16 --input-size 3 64 64
              --warmup 2 --iters 5)
else
  BENCH_ARGS=(--device cuda --models resnet50,efficientnet_b0,convnext_tiny,densenet121 --batch-sizes 1,64
              --dtypes fp32,bf16 --warmup 5 --iters 20)
fi
log "benchmarks, ${LEFT}s left; log: $OUT_DIR/gpu_bench.log"
set +e
timeout --signal=INT --kill-after=20 $(( LEFT + 10 )) "$PY" benchmarks/gpu_bench.py "${BENCH_ARGS[@]}" \
  --modes "$MODES" --deadline "$DEADLINE" --out "$OUT_DIR" >"$OUT_DIR/gpu_bench.log" 2>&1
BENCH_RC=$?
set -e
grep -E '^gpu_bench: (ERROR|SKIP|interrupted)' "$OUT_DIR/gpu_bench.log" | head -n 40 || true
if [ -f "$OUT_DIR/gpu_bench.md" ]; then
  echo; cat "$OUT_DIR/gpu_bench.md"; echo
else
  tail -n 60 "$OUT_DIR/gpu_bench.log"
  log "BENCHMARKS WROTE NO TABLE (rc=$BENCH_RC)"
fi
case $BENCH_RC in
  0) log "benchmarks done" ;;
  124|130|137) log "BENCHMARKS INTERRUPTED at the time limit (rc=$BENCH_RC): the table holds what was measured" ;;
  *) log "BENCHMARKS HAD FAILURES (rc=$BENCH_RC): see $OUT_DIR/gpu_bench.log" ;;
esac

# 5. latency budget ---------------------------------------------------------------------------------------
LAT_RC=0
LEFT=$(( FINAL_DEADLINE - $(date +%s) ))
if [ "$LATENCY_S" -eq 0 ]; then
  log "latency budget skipped (FXSURGEON_GPU_CHECK_LATENCY_S=0)"
elif [ "$LEFT" -lt 60 ]; then
  log "LATENCY BUDGET NOT RUN: only ${LEFT}s left"
else
  if [ "$DEVICE" = cpu ]; then
    LAT_ARGS=(--device cpu --models resnet20 --targets 0.7 --threads 1 --batch-sizes 1 --runtimes eager
              --rounds 2 --iters 3 --calibration-images 250)
  else
    LAT_ARGS=(--device cuda --dtype bf16 --models resnet50 --targets 0.7 --batch-sizes 64,1
              --runtimes compiled,eager --rounds 5 --iters 20)
  fi
  log "latency budget, ${LEFT}s left; log: $OUT_DIR/latency_budget.log"
  set +e
  timeout --signal=INT --kill-after=20 $(( LEFT + 10 )) "$PY" benchmarks/latency_budget.py "${LAT_ARGS[@]}" \
    --deadline "$FINAL_DEADLINE" --cache-dir "$OUT_DIR/latency_cache" --out "$OUT_DIR/latency_budget.json" \
    >"$OUT_DIR/latency_budget.log" 2>&1
  LAT_RC=$?
  set -e
  grep -E '^(  |latency_budget: )' "$OUT_DIR/latency_budget.log" | head -n 40 || true
  case $LAT_RC in
    0) log "latency budget done: $OUT_DIR/latency_budget.json" ;;
    124|130|137) log "LATENCY BUDGET INTERRUPTED at the time limit (rc=$LAT_RC): the JSON holds the rows finished" ;;
    *) log "LATENCY BUDGET HAD FAILURES (rc=$LAT_RC): see $OUT_DIR/latency_budget.log" ;;
  esac
fi

log "done in $(( $(date +%s) - START ))s: tests rc=$TEST_RC, benchmarks rc=$BENCH_RC, latency rc=$LAT_RC; files in $OUT_DIR"
[ "$TEST_RC" -eq 0 ] && [ "$BENCH_RC" -eq 0 ] && [ "$LAT_RC" -eq 0 ]
