#!/usr/bin/env bash
# The whole GPU benchmark of issue 7 in one call (a lent H100/H200 has minutes, not hours).
# Writes JSON rows under $OUT (or ./out) and prints the BENCHMARKS.md tables last.
# Usage (on the device machine, repo root):  bash benchmarks/gpu_bench.sh
# CPU dry run with tiny shapes:              MODEL=tiny-falcon PALM=tiny PROMPT_LONG=64 bash benchmarks/gpu_bench.sh
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
MODEL=${MODEL:-falcon-7b}; PALM=${PALM:-palm-8b}; PROMPT_LONG=${PROMPT_LONG:-2048}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch (the peer) shares the GPU with JAX
PY=${PY:-python3}
if ! $PY -c "import meshserve.serving.bench" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 90 $PY benchmarks/int8_probe.py 2>&1 | grep -v Warning | tee "$OUT/int8_probe.txt"
grep -q "cudnn attention FAILED" "$OUT/int8_probe.txt" && export MESHSERVE_ATTENTION=xla
DEADLINE=${DEADLINE:-540}  # seconds for the whole script; later steps shrink or are skipped to end in time
bench() { local name=$1 limit=$2; shift 2; local t0=$SECONDS left=$((DEADLINE - SECONDS - 15))
  [ "$left" -lt 30 ] && { echo "!! $name skipped: out of time"; return; }
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" $PY -m meshserve.serving.cli bench --json --out "$OUT/$name.json" "$@" > /dev/null \
    2> "$OUT/$name.log" || echo "!! $name failed or timed out (see $name.log)"; tail -n 3 "$OUT/$name.log" | grep -v "%|" || true
  echo "== $name done in $((SECONDS - t0)) s"; }
# Most important first: the targets (falcon-7b, 128 + 128, batch 1 and 64, bf16 and int8, vs transformers).
bench falcon_b1_b64 230 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 128 --weights bf16,int8 --peer
bench falcon_prefill_long 80 --model "$MODEL" --batch 1 --prompt-len "$PROMPT_LONG" --gen-len 0 --weights bf16
bench falcon_b8_b256 150 --model "$MODEL" --batch 8,256 --prompt-len 128 --gen-len 128 --weights bf16,int8 --peer
bench falcon_scan 60 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 32 --weights bf16 --layers scan
bench palm 90 --model "$PALM" --batch 1,64 --prompt-len 128 --gen-len 64 --weights bf16,int8
$PY benchmarks/report.py "$OUT"/*.json | tee "$OUT/BENCHMARKS.part.md"
