#!/usr/bin/env bash
# The GPU benchmark of issue 7, as named steps sized for the device's limits (15 minutes of device time in all,
# machine start-up included; at most 10 minutes a command). Steps append JSON rows under $OUT; at the end the rows
# are merged into $OUT/rows.json, the tables printed and written to $OUT/BENCHMARKS.part.md, the plot drawn, and the
# logs packed into $OUT/logs.tgz, so at most 5 files come back.
#
#   DEADLINE=450 bash benchmarks/gpu_bench.sh              # call 1 (default STEPS): tune int8, the targets, prefill
#   TUNING=benchmarks/results/int8_tuning.falcon-7b.json STEPS="tune b8 b256" DEADLINE=300 bash benchmarks/gpu_bench.sh
#                                                          # call 2, with call 1's tuning file copied into the tree
#   MODEL=tiny-falcon PALM=tiny PROMPT_LONG=64 SMALL=1 STEPS="tune targets prefill b8 palm" \
#     BENCH_EXTRA="--set max_seq_len=256" PY=.venv/bin/python OUT=/tmp/gb TUNING=/tmp/gb-tuning.json \
#     bash benchmarks/gpu_bench.sh                        # CPU dry run (tiny models' context is 128 tokens)
#   MODEL=tiny-falcon STEPS="hlo flags" BENCH_EXTRA="--set max_seq_len=256" PY=.venv/bin/python OUT=/tmp/gb2 \
#     DEADLINE=400 bash benchmarks/gpu_bench.sh           # CPU dry run of the hlo and flags steps
#   MODEL=tiny PROMPT_LONG=64 SMALL=1 STEPS=attn BENCH_EXTRA="--set max_seq_len=256" PY=.venv/bin/python \
#     OUT=/tmp/gb-attn TUNING=/tmp/gb-tuning.json DEADLINE=300 bash benchmarks/gpu_bench.sh
#                                                          # CPU dry run of attn (tiny-falcon's head dim 8: xla rows)
#
# Steps: tune (benchmarks/int8_probe.py --tune: the fastest int8 matmul per shape, Pallas or XLA; reused when
# $TUNING exists), targets (falcon-7b 128+128 at batch 1 and 64, bf16 + int8, transformers peer), prefill (2048
# tokens), b8, b256, palm (palm-8b batch 1 and 64, int8 through the default path, XLA's, since the tuning is
# falcon's; the targets and b8 rows' int8 too when no tuning file was made), w8a8 (falcon-7b int8
# batch 1 and 64 with int8 activations: an int8 x int8 GEMM, model/quant.py), scan (lax.scan),
# coldstart (benchmarks/cold_start.py: `meshserve serve --model $MODEL` from an empty compile cache, time to
# `listening on` and TTFT while the background warm-up compiles; writes cold_start.json and cold_start.png),
# spec (benchmarks/speculative.py on $MODEL: a verify step of 4 and 8 drafts against a decode step at batch 1;
# random weights keep few drafts, so the step-cost ratio is the number to read; writes speculative.json),
# slots (benchmarks/slot_overhead.py: whether a decode step of b rows pays for a cache of 32 or 128 slots),
# guided (benchmarks/guided.py on $MODEL: wall ms per step of guided rows, json_object / a schema, against free ones
# at batch 1 and 8, each with guided steps pipelined, read first and auto (the way a server would settle on), and the
# engine thread's time per guided token; writes guided.json),
# kvint8 (`meshserve bench --kv-cache-dtype auto,int8` on $KV_MODEL, default llama-2-7b: multi-head, so its KV cache
# at batch 32 x 1088 tokens (17 GiB in bf16) outweighs its weights; the int8 cache's decode step against bf16's),
# hlo (benchmarks/decode_hlo.py on $MODEL, batch 1, bf16 and int8, 128+64: the decode loop compiled, not run, and the
# kernels, command buffers and host syncs of one step counted in its optimized HLO, then bf16 again under the flags
# step's `while` variant and int8 with --int8-matmul rowsum; writes decode_hlo.json, the tables in decode_hlo*.txt
# and each module's HLO text, both into logs.tgz; BENCH_EXTRA goes to it too, so only --set there; ~6 s on a CPU for
# falcon-7b, the GPU's time unknown),
# flags (bf16 decode at batch 1, 128+64, once per XLA_FLAGS variant, appended to $XLA_FLAGS: default, nocmdbuf (no
# command buffers), while (the decode loop's while and sampling's conditionals inside CUDA graphs too), unroll (while +
# loops unrolled inside the graph), exhaustive (autotuning over every Triton GEMM tiling; not in the default list);
# FLAGS_VARIANTS, FLAGS_WEIGHTS and FLAGS_BATCH pick other rows; writes flags_<variant>.json, rows tagged
# "xla_flags": <variant> for the table),
# rowsum (falcon-7b int8 at batch 1, 8 and 64 with `--int8-matmul rowsum`, then with xla, the default),
# attn (model/decode_attention.py's kernel, `--decode-attention pallas`: falcon-7b bf16 at batch 1 and 64, 128+64
# as the flags step's rows, the same rows with `--decode-attention xla`, then int8 at batch 1 with the kernel; each
# row's decode_attention says "pallas" where the kernel ran (report.py's layers cell: "unrolled, attn kernel"), and the
# flags step's default variant is its bf16 baseline). Every call first checks the kernel (benchmarks/attn_check.py:
# against XLA's attention and float64 on the device); a failure makes every step use XLA's attention.
# kernel (the targets' rows with the attention kernel: bf16 and int8 at batch 1 and 64, 128+128, with the peer, then
# bf16 with XLA's attention), int8xla (int8 at batch 1 and 64 with `--int8-matmul xla`), profile
# (benchmarks/profile_step.py: decode bf16 and int8 at batch 1 and 64, and a $PROMPT_LONG-token bf16 prefill; kernel
# time per step by name and kind, in logs.tgz),
# attnsweep (benchmarks/attn_sweep.py: the attention kernel alone per block / warps / stages / splits against XLA's
# attention, falcon-7b at batch 1 and 64 and a GQA shape; attn_sweep.jsonl in logs.tgz),
# probe (benchmarks/int8_probe.py at M = 1 and 64 without Pallas configs: per int8 weight shape, bf16's GEMM against
# XLA's int8 convert + GEMM and w8a8, each over [K, N] and over [N, K] weights, and at M = 1 the reductions; GB/s of
# weight bytes in int8_probe.txt; writes no tuning file).
# hlo, flags, rowsum, attn, kernel, int8xla, profile, attnsweep and probe are not in the default STEPS.
# Set DEADLINE to the device time left minus start-up (~90 s) and a margin, and the call's timeout to DEADLINE + 30.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
MODEL=${MODEL:-falcon-7b}; PALM=${PALM:-palm-8b}; PROMPT_LONG=${PROMPT_LONG:-2048}
STEPS=${STEPS:-tune targets prefill}
DEADLINE=${DEADLINE:-450}  # seconds for this call; later steps shrink or are skipped to end in time
TUNING=${TUNING:-/tmp/meshserve_int8_tuning.$MODEL.json}
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false  # torch (the peer) shares the GPU with JAX
PY=${PY:-python3}
read -r -a bench_extra <<< "${BENCH_EXTRA:-}"  # more `meshserve bench` flags for every step (the dry run's --set)
if ! $PY -c "import meshserve.serving.bench" 2>/dev/null; then
  $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
# Every call checks cuDNN attention at the bench's prefill shapes first (seconds): a failure means XLA attention.
timeout 60 $PY benchmarks/int8_probe.py --model "$MODEL" --attention-only 2>&1 | grep -v -i warning \
  | tee "$OUT/attention.txt"
grep -q "cudnn attention FAILED (causal)" "$OUT/attention.txt" && export MESHSERVE_ATTENTION=xla \
  && echo "== cuDNN attention failed: using XLA attention"
# ... and the decode attention kernel, CUDA's default, against XLA's attention and float64 (seconds): a fast but wrong
# kernel shows here, and a failure switches every step to XLA's attention.
kernel_attention=pallas
timeout 180 $PY benchmarks/attn_check.py 2>&1 | grep -v -i warning | tee "$OUT/attn_check.txt"
if ! grep -q "all cases match" "$OUT/attn_check.txt"; then
  echo "!! decode step kernels: check failed, see attn_check.txt; XLA's attention and norms from here on"
  kernel_attention=xla; export MESHSERVE_DECODE_ATTENTION=xla
fi

left() { echo $((DEADLINE - SECONDS - 20)); }
bench() {  # bench NAME LIMIT_S ARGS...: one `meshserve bench` call, cut to the time left; rows saved as they finish
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  [ "$(left)" -lt 30 ] && { echo "!! $name skipped: out of time"; return; }
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  local rc=0
  timeout "$limit" $PY -m meshserve.serving.cli bench --json --out "$OUT/$name.json" "$@" "${bench_extra[@]}" > /dev/null \
    2> "$OUT/$name.log" || { rc=$?; echo "!! $name failed or timed out after $((SECONDS - t0)) s (see $name.log)"; }
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -qi "cudnn" "$OUT/$name.log" && [ -z "${MESHSERVE_ATTENTION:-}" ] \
    && [ "$(left)" -ge 60 ]; then
    echo "!! $name: cuDNN error, once more with XLA attention"
    MESHSERVE_ATTENTION=xla timeout "$(left)" $PY -m meshserve.serving.cli bench --json --out "$OUT/$name.json" \
      "$@" "${bench_extra[@]}" > /dev/null 2> "$OUT/$name.xla.log" || echo "!! $name failed again (see $name.xla.log)"
  fi
  grep -v "%|" "$OUT/$name.log" | tail -n 3
  echo "== $name done in $((SECONDS - t0)) s"
}
xla_variant() {  # xla_variant NAME: the XLA_FLAGS the flags step's variant NAME adds (command buffers = CUDA graphs)
  case $1 in
    default) echo "" ;;
    nocmdbuf) echo "--xla_gpu_enable_command_buffer=" ;;
    while) echo "--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL --xla_gpu_graph_min_graph_size=1" ;;
    unroll) echo "$(xla_variant while) --xla_gpu_command_buffer_unroll_loops=true" ;;
    exhaustive) echo "--xla_gpu_exhaustive_tiling_search=true" ;;  # autotune GEMMs over every Triton tiling
  esac
}
with_flags() {  # with_flags NAME: the caller's XLA_FLAGS plus variant NAME's; never blank (XLA reads a blank as a file)
  local extra; extra=$(xla_variant "$1")
  echo "${XLA_FLAGS:-}${extra:+ $extra}"
}
int8_args=()
for step in $STEPS; do
  case $step in
    tune)
      if [ -s "$TUNING" ]; then
        echo "== reusing $TUNING: $($PY -c "import json,sys; d=json.load(open(sys.argv[1])); \
print(d['model'], 'on', d['device'], len(d['configs']), 'shapes')" "$TUNING")"
      else
        small=(); [ "${SMALL:-0}" = 1 ] && small=(--small)
        budget=$(( $(left) / 5 ))  # ~80 s of 450: the targets and prefill steps need the rest
        timeout $((budget + 40)) $PY benchmarks/int8_probe.py --model "$MODEL" --rows 1,8,64 --tune "$TUNING" \
          --budget-s "$budget" "${small[@]}" 2>&1 | grep -v -i warning | tee "$OUT/int8_probe.txt"
        # Does XLA fuse the int8 convert into a Triton GEMM when told to use Triton for every GEMM? (seconds)
        XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_triton_gemm_any=true" timeout 45 $PY benchmarks/int8_probe.py \
          --model "$MODEL" --rows 1,8,64 --xla-only "${small[@]}" 2>&1 | grep -v -i warning \
          | sed 's/^/[triton_gemm_any] /' | tee -a "$OUT/int8_probe.txt"
      fi
      if [ -s "$TUNING" ]; then
        cp "$TUNING" "$OUT/int8_tuning.json"
        int8_args=(--int8-matmul pallas --int8-tuning "$TUNING")
      fi
      ;;
    probe)  # the int8 matmul forms side by side at M = 1 and 64, no Pallas configs and no tuning file (~2 min)
      small=(); [ "${SMALL:-0}" = 1 ] && small=(--small)
      budget=$(( $(left) < 150 ? $(left) : 150 ))
      [ "$budget" -lt 30 ] && { echo "== probe: skipped, ${budget} s left"; continue; }
      timeout $((budget + 40)) $PY benchmarks/int8_probe.py --model "$MODEL" --rows 1,64 --candidates 0 \
        --budget-s "$budget" "${small[@]}" 2>&1 | grep -v -i warning | tee "$OUT/int8_probe.txt" ;;
    targets) bench falcon_b1_b64 220 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 128 \
               --weights bf16,int8 --peer "${int8_args[@]}" ;;
    prefill) bench falcon_prefill_long 70 --model "$MODEL" --batch 1 --prompt-len "$PROMPT_LONG" --gen-len 0 \
               --weights bf16 ;;
    b8)   bench falcon_b8 150 --model "$MODEL" --batch 8 --prompt-len 128 --gen-len 128 --weights bf16,int8 --peer \
            "${int8_args[@]}" ;;
    b256) bench falcon_b256 200 --model "$MODEL" --batch 256 --prompt-len 128 --gen-len 128 --weights bf16,int8 \
            --peer ;;
    palm) bench palm 150 --model "$PALM" --batch 1,64 --prompt-len 128 --gen-len 64 --weights bf16,int8 ;;
    w8a8) bench falcon_w8a8 150 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 128 --weights int8 \
            --int8-matmul w8a8 ;;
    scan) bench falcon_scan 60 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 32 --weights bf16 \
            --layers scan ;;
    coldstart)  # not in the default STEPS: how long a 7B server takes to answer from an empty compile cache
      if [ "$(left)" -ge 60 ]; then
        timeout "$(left)" $PY benchmarks/cold_start.py --model "$MODEL" --modes background --after 3 \
          --max-seconds $(( $(left) - 30 )) --json --plot "$OUT/cold_start.png" > "$OUT/cold_start.json" \
          2> "$OUT/cold_start.log" || echo "!! coldstart failed (see cold_start.log)"
        tail -n 3 "$OUT/cold_start.log"
      else echo "!! coldstart skipped: out of time"; fi ;;
    spec)  # not in the default STEPS: the verify step's cost against a decode step at b=1 (speculative decoding)
      if [ "$(left)" -ge 60 ]; then
        timeout "$(left)" $PY benchmarks/speculative.py --model "$MODEL" --tokens 4,8 --new-tokens 64 --json \
          > "$OUT/speculative.json" 2> "$OUT/speculative.log" || echo "!! spec failed (see speculative.log)"
        tail -n 3 "$OUT/speculative.log"
      else echo "!! spec skipped: out of time"; fi ;;
    slots)  # not in the default STEPS: decode step time at b = 1 and 8 with 32 and 128 slots (serve --max-batch)
      if [ "$(left)" -ge 60 ]; then
        timeout "$(left)" $PY benchmarks/slot_overhead.py --model "$MODEL" --batch 1,8 --slots 32,128 --json \
          > "$OUT/slot_overhead.json" 2> "$OUT/slot_overhead.log" || echo "!! slots failed (see slot_overhead.log)"
        tail -n 3 "$OUT/slot_overhead.log"
      else echo "!! slots skipped: out of time"; fi ;;
    guided)  # not in the default STEPS: what guided decoding costs a decode step, pipelined or read first
      if [ "$(left)" -ge 60 ]; then
        timeout "$(left)" $PY benchmarks/guided.py --model "$MODEL" --batch 1,8 --new-tokens 64 --repeats 2 --json \
          > "$OUT/guided.json" 2> "$OUT/guided.log" || echo "!! guided failed (see guided.log)"
        tail -n 3 "$OUT/guided.log"
      else echo "!! guided skipped: out of time"; fi ;;
    kvint8)  # not in the default STEPS: the int8 KV cache against bf16 where the cache is read more than the weights
      bench kv_int8 200 --model "${KV_MODEL:-llama-2-7b}" --batch "${KV_BATCH:-8,32}" --prompt-len "${KV_PROMPT:-1024}" \
        --gen-len 64 --weights bf16 --kv-cache-dtype auto,int8 ;;
    hlo)  # not in the default STEPS: what one decode step launches (compiles only: no weights, no timed runs)
      t0=$SECONDS
      if [ "$(left)" -ge 60 ]; then
        limit=$(left); [ "$limit" -gt 240 ] && limit=240
        timeout "$limit" $PY benchmarks/decode_hlo.py --model "$MODEL" --batch 1 --weights bf16,int8 --prompt-len 128 \
          --gen-len 64 --label default --out "$OUT/decode_hlo.json" --dump "$OUT" "${bench_extra[@]}" \
          > "$OUT/decode_hlo.txt" 2> "$OUT/decode_hlo.log" || echo "!! hlo failed or timed out (see decode_hlo.log)"
        cat "$OUT/decode_hlo.txt"; grep -v -i warning "$OUT/decode_hlo.log" | tail -n 3
      else echo "!! hlo skipped: out of time"; fi
      # Two more compiles, rows joining decode_hlo.json: bf16 under the flags step's `while` variant (does XLA put
      # the decode loop and sampling's conditionals in a command buffer? a flag this XLA lacks aborts only this run)
      # and int8 with --int8-matmul rowsum (what the row reductions launch).
      for extra in while rowsum; do
        [ "$(left)" -lt 60 ] && { echo "!! hlo ($extra) skipped: out of time"; continue; }
        limit=$(left); [ "$limit" -gt 120 ] && limit=120
        if [ "$extra" = while ]; then flags=$(with_flags while); args=(--weights bf16); else
          flags=${XLA_FLAGS:-}; args=(--weights int8 --int8-matmul rowsum); fi
        XLA_FLAGS="$flags" timeout "$limit" $PY benchmarks/decode_hlo.py --model "$MODEL" --batch 1 "${args[@]}" \
          --prompt-len 128 --gen-len 64 --no-layer-delta --label "$extra" --out "$OUT/decode_hlo_$extra.json" \
          --dump "$OUT" "${bench_extra[@]}" > "$OUT/decode_hlo.$extra.txt" 2> "$OUT/decode_hlo.$extra.log" \
          || echo "!! hlo ($extra) failed or timed out (see decode_hlo.$extra.log)"
        cat "$OUT/decode_hlo.$extra.txt"; grep -v -i warning "$OUT/decode_hlo.$extra.log" | tail -n 3
        if [ -s "$OUT/decode_hlo_$extra.json" ]; then
          $PY -c "import json,os,sys; a, b = sys.argv[1:]; rows=json.load(open(a)) if os.path.exists(a) else []; \
json.dump(rows + json.load(open(b)), open(a, 'w'), indent=1)" "$OUT/decode_hlo.json" "$OUT/decode_hlo_$extra.json" \
            && rm "$OUT/decode_hlo_$extra.json"
        fi
      done
      echo "== hlo done in $((SECONDS - t0)) s" ;;
    flags)  # not in the default STEPS: does the per-step cost move with XLA's command buffers (CUDA graphs)?
      # FLAGS_VARIANTS / FLAGS_WEIGHTS / FLAGS_BATCH choose the rows, e.g. FLAGS_WEIGHTS=int8 FLAGS_BATCH=1,64
      # FLAGS_VARIANTS="default exhaustive": does a wider autotuning search find int8 GEMM tilings that stream faster?
      read -r -a flag_variants <<< "${FLAGS_VARIANTS:-default while unroll nocmdbuf}"
      for variant in "${flag_variants[@]}"; do  # the informative ones first, should time run short
        xla_flags=$(with_flags "$variant")
        echo "== flags_$variant: XLA_FLAGS=$xla_flags"
        # A variant that fails (a flag this XLA does not know aborts the process) leaves no rows; the next still runs.
        XLA_FLAGS="$xla_flags" bench "flags_$variant" 120 --model "$MODEL" --batch "${FLAGS_BATCH:-1}" \
          --prompt-len 128 --gen-len 64 --weights "${FLAGS_WEIGHTS:-bf16}"
        if [ -s "$OUT/flags_$variant.json" ]; then  # the variant's name in each row: report.py's XLA flags column
          $PY -c "import json,sys; p=sys.argv[1]; rows=json.load(open(p)); \
[r.update(xla_flags=sys.argv[2]) for r in rows]; json.dump(rows, open(p, 'w'), indent=2)" "$OUT/flags_$variant.json" \
            "$variant"
        fi
      done ;;
    rowsum) bench falcon_rowsum 150 --model "$MODEL" --batch 1,8,64 --prompt-len 128 --gen-len 128 --weights int8 \
              --int8-matmul rowsum  # against XLA's path, the default (rowsum was CUDA's on 2026-11-28 only)
            bench falcon_int8xla 150 --model "$MODEL" --batch 1,8,64 --prompt-len 128 --gen-len 128 --weights int8 \
              --int8-matmul xla ;;
    kernel)  # not in the default STEPS: the targets' rows (128+128, batch 1 and 64, peer) with the attention kernel
      # bf16 and int8 (the default int8 path) with the kernel (unless the preamble's check failed) and transformers
      # beside them, then bf16 with XLA's attention for the ratio.
      bench falcon_kernel 240 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 128 --weights bf16,int8 --peer \
        --decode-attention "$kernel_attention" "${int8_args[@]}"
      bench falcon_kernel_xla 110 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 128 --weights bf16 \
        --decode-attention xla ;;
    attnsweep)  # not in the default STEPS: the attention kernel alone per launch config (benchmarks/attn_sweep.py)
      if [ "$(left)" -ge 45 ]; then
        limit=$(left); [ "$limit" -gt 150 ] && limit=150
        small=(); [ "${SMALL:-0}" = 1 ] && small=(--small --layers 2 --repeats 2)
        timeout "$limit" $PY benchmarks/attn_sweep.py --json "${small[@]}" > "$OUT/attn_sweep.jsonl" \
          2> "$OUT/attn_sweep.log" || echo "!! attnsweep failed or timed out (see attn_sweep.log)"
        [ -s "$OUT/attn_sweep.jsonl" ] && $PY -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; \
[print(s, *['%.2f us %s' % (r['us_per_layer'], r['config']) for r in sorted((r for r in rows if r['shape'] == s \
and r.get('us_per_layer') and not (isinstance(r['config'], dict) and r['config'].get('rotary'))), \
key=lambda r: r['us_per_layer'])[:4]], sep='\n  ') for s in dict.fromkeys(r['shape'] \
for r in rows)]" "$OUT/attn_sweep.jsonl"
      else echo "!! attnsweep skipped: out of time"; fi ;;
    profile)  # not in the default STEPS: where a decode step's time goes, per kernel (benchmarks/profile_step.py)
      for row in "bf16 1 decode 128" "int8 1 decode 128" "bf16 64 decode 128" "int8 64 decode 128" \
        "bf16 1 prefill $PROMPT_LONG"; do  # int8 at 64: why does it trail bf16 there with half the bytes?
        read -r weights batch phase prompt <<< "$row"
        name="profile_${weights}_${batch}_$phase"
        [ "$(left)" -lt 45 ] && { echo "!! $name skipped: out of time"; continue; }
        limit=$(left); [ "$limit" -gt 90 ] && limit=90
        timeout "$limit" $PY benchmarks/profile_step.py --model "$MODEL" --weights "$weights" --batch "$batch" \
          --phase "$phase" --prompt-len "$prompt" --steps 32 --top 30 --json "${bench_extra[@]}" > "$OUT/$name.json" \
          2> "$OUT/$name.log" || echo "!! $name failed (see $name.log)"
        [ -s "$OUT/$name.json" ] && $PY -c "import json,sys; sys.path.insert(0, 'benchmarks'); \
from profile_step import print_table; print_table(json.load(open(sys.argv[1])))" "$OUT/$name.json"
      done ;;
    int8xla)  # not in the default STEPS: int8 at batch 1 and 64 through XLA's convert + GEMM (the default again
      # since 2026-11-28, so `kernel`'s int8 rows take it too unless `tune` ran first)
      bench falcon_int8xla 110 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 128 --weights int8 \
        --int8-matmul xla ;;
    attn)  # not in the default STEPS: one Pallas kernel for a layer's decode attention (XLA's: ~9)
      bench falcon_attn 110 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 64 --weights bf16 \
        --decode-attention pallas
      bench falcon_attn_xla 110 --model "$MODEL" --batch 1,64 --prompt-len 128 --gen-len 64 --weights bf16 \
        --decode-attention xla  # the same rows with XLA's attention, on the same card, for the ratio
      bench falcon_attn_int8 80 --model "$MODEL" --batch 1 --prompt-len 128 --gen-len 64 --weights int8 \
        --decode-attention pallas "${int8_args[@]}" ;;
    *) echo "!! unknown step $step" ;;
  esac
done
# Consolidate: one rows file, the tables, the plot, the tuning file and one archive of logs.
steps_json=$(ls "$OUT"/falcon_*.json "$OUT"/palm.json "$OUT"/flags_*.json 2>/dev/null)
if [ -n "$steps_json" ]; then
  $PY -c "import json,sys; json.dump([r for p in sys.argv[1:] for r in json.load(open(p))], \
open('$OUT/rows.json', 'w'), indent=1)" $steps_json
  $PY benchmarks/report.py --plot "$OUT/decode.png" "$OUT/rows.json" | tee "$OUT/BENCHMARKS.part.md"
fi
(cd "$OUT" && tar czf logs.tgz --remove-files $(ls *.log *.txt profile_*.json attn_sweep.jsonl 2>/dev/null) \
  $(basename -a $steps_json 2>/dev/null) 2>/dev/null; ls)
