#!/usr/bin/env bash
# Second GPU call of issue 7: is the fused Pallas int8 kernel faster than XLA's convert + GEMM, and what does it
# do to falcon-7b decode? Probe first; the bench uses the kernel only if the probe says it is faster at M=1.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"; DEADLINE=${DEADLINE:-300}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
$PY -c "import meshserve.model.int8_kernel" 2>/dev/null || $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 2
timeout 75 $PY benchmarks/int8_probe.py 2>&1 | grep -v -i warning | tee "$OUT/int8_probe2.txt"
dot=$(awk '$1=="int8-dot" && $2==1 {print $3}' "$OUT/int8_probe2.txt"); pal=$(awk '$1=="int8-pal" && $2==1 {print $3}' "$OUT/int8_probe2.txt")
if [ -n "$pal" ] && [ "$pal" != "FAILED" ] && awk -v p="$pal" -v d="$dot" 'BEGIN{exit !(p < d)}'; then
  export MESHSERVE_INT8_MATMUL=pallas; echo "== using the Pallas int8 kernel ($pal us vs $dot us)"
else echo "== keeping XLA int8 ($pal vs $dot)"; fi
left=$((DEADLINE - SECONDS - 10))
timeout "$left" $PY -m meshserve.serving.cli bench --model "${MODEL:-falcon-7b}" --batch 1,64 --prompt-len 128 \
  --gen-len 128 --weights bf16,int8 --peer --json --out "$OUT/falcon_int8.json" > /dev/null 2> "$OUT/falcon_int8.log" \
  || { echo "!! bench failed or timed out"; tail -n 5 "$OUT/falcon_int8.log"; }
$PY benchmarks/report.py "$OUT"/falcon_int8.json | tee "$OUT/BENCHMARKS.int8.md"
