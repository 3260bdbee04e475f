#!/usr/bin/env bash
# The GPU benchmark of issue 7, as steps that fit the device's 10-minute command limit (a lent H100/H200 has minutes).
# Writes JSON rows and logs under $OUT (or ./out) and prints the BENCHMARKS.md tables last.
#
#   bash benchmarks/gpu_bench.sh                    # call 1 (default STEPS): tune int8, the targets, long prefill
#   STEPS="tune b8 b256 palm" bash benchmarks/gpu_bench.sh    # call 2 (tuning is reused while the machine is warm)
#   MODEL=tiny-falcon PALM=tiny PROMPT_LONG=64 SMALL=1 bash benchmarks/gpu_bench.sh   # CPU dry run, tiny shapes
#
# Steps: tune (benchmarks/int8_probe.py --tune: the fastest int8 matmul per shape, Pallas or XLA), targets
# (falcon-7b 128+128 at batch 1 and 64, bf16 + int8 with the tuning, transformers peer), prefill (2048 tokens),
# b8, b256, palm (palm-8b batch 1 and 64), scan (lax.scan layer loop, for comparison).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
MODEL=${MODEL:-falcon-7b}; PALM=${PALM:-palm-8b}; PROMPT_LONG=${PROMPT_LONG:-2048}
STEPS=${STEPS:-tune targets prefill}
DEADLINE=${DEADLINE:-570}  # seconds for the whole call; later steps shrink or are skipped to end in time
TUNING=${TUNING:-/tmp/meshserve_int8_tuning.json}  # kept between calls on a warm machine
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch (the peer) shares the GPU with JAX
PY=${PY:-python3}
if ! $PY -c "import meshserve.serving.bench" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"

left() { echo $((DEADLINE - SECONDS - 15)); }
bench() {  # bench NAME LIMIT_S ARGS...: one `meshserve bench` call, cut to the time left
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  [ "$(left)" -lt 30 ] && { echo "!! $name skipped: out of time"; return; }
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  timeout "$limit" $PY -m meshserve.serving.cli bench --json --out "$OUT/$name.json" "$@" > /dev/null \
    2> "$OUT/$name.log" || echo "!! $name failed or timed out (see $name.log)"
  grep -v "%|" "$OUT/$name.log" | tail -n 3
  echo "== $name done in $((SECONDS - t0)) s"
}
int8_args=()
for step in $STEPS; do
  case $step in
    tune)
      if [ ! -s "$TUNING" ]; then
        small=(); [ "${SMALL:-0}" = 1 ] && small=(--small)
        timeout 200 $PY benchmarks/int8_probe.py --model "$MODEL" --rows 1,8,64 --tune "$TUNING" --budget-s 150 \
          "${small[@]}" 2>&1 | grep -v -i warning | tee "$OUT/int8_probe.txt"
        grep -q "cudnn attention FAILED (causal)" "$OUT/int8_probe.txt" && echo "MESHSERVE_ATTENTION=xla" > "$OUT/attention.env"
      fi
      [ -s "$TUNING" ] && cp "$TUNING" "${TUNING%.json}.results.json" "$OUT/" 2>/dev/null; [ -s "$TUNING" ] && int8_args=(--int8-matmul pallas --int8-tuning "$TUNING")
      ;;
    targets) bench falcon_b1_b64 240 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 128 \
               --weights bf16,int8 --peer "${int8_args[@]}" ;;
    prefill) bench falcon_prefill_long 90 --model "$MODEL" --batch 1 --prompt-len "$PROMPT_LONG" --gen-len 0 \
               --weights bf16 ;;
    b8)   bench falcon_b8 150 --model "$MODEL" --batch 8 --prompt-len 128 --gen-len 128 --weights bf16,int8 --peer \
            "${int8_args[@]}" ;;
    b256) bench falcon_b256 200 --model "$MODEL" --batch 256 --prompt-len 128 --gen-len 128 --weights bf16,int8 \
            --peer ;;
    palm) bench palm 150 --model "$PALM" --batch 1,64 --prompt-len 128 --gen-len 64 --weights bf16,int8 \
            "${int8_args[@]}" ;;
    scan) bench falcon_scan 60 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 32 --weights bf16 \
            --layers scan ;;
    *) echo "!! unknown step $step" ;;
  esac
  [ -s "$OUT/attention.env" ] && export "$(cat "$OUT/attention.env")"  # cuDNN attention failed: XLA attention
done
rows=$(ls "$OUT"/falcon_*.json "$OUT"/palm.json 2>/dev/null); [ -n "$rows" ] && $PY benchmarks/report.py --plot "$OUT/decode.png" $rows \
  | tee "$OUT/BENCHMARKS.part.md"
