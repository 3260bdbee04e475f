"""What a server's decode slots cost a small batch: the engine's decode step for b live rows, with the KV cache
holding b, 32 or 128 slots (`serve --max-batch`). A step writes rows [0, b) back into the [N, B, S, K, Q] cache;
where the backend does not update that buffer in place (XLA's CPU backend), the step copies all B slots and its
time grows with B (BUILD.md, "Benchmarks and GPU notes").

    python benchmarks/slot_overhead.py                          # the demo model, b = 1 and 4
    python benchmarks/slot_overhead.py --model falcon-7b --batch 1,8 --slots 32,128 --context 2048 --json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

from timing import median_ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--model", help="a preset with random weights instead (e.g. falcon-7b)")
    p.add_argument("--weights", choices=["f32", "bf16", "int8"], help="weight dtype (default: the checkpoint's)")
    p.add_argument("--batch", default="1,4", help="live rows b (default 1,4)")
    p.add_argument("--slots", default="32,128", help="cache slots B besides b itself (default 32,128)")
    p.add_argument("--context", type=int, help="cache length S (default: the model's max_seq_len, at most 2048)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per point (default 30)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args()
    import jax
    from meshserve.model.loading import load_model
    from meshserve.model.sampling import SamplingParams
    from meshserve.serving.engine import Engine
    from meshserve.serving.plan import make_plan

    model = load_model(args.checkpoint, weights=args.weights, preset=args.model)
    S = args.context or min(2048, model.config.max_seq_len)
    rows = []
    for b in (int(x) for x in args.batch.split(",")):
        for B in sorted({b, *(int(x) for x in args.slots.split(","))}):
            if b > B:
                continue
            plan = make_plan(model.config, max_batch=B, max_context=S, length_buckets=(16,),
                             decode_buckets=tuple(sorted({b, B})), context_buckets=(S,))  # fmt: skip
            engine = Engine(model.params, model.config, plan)
            engine.warm_up(phases=("generate",))
            prompt = model.encode_prompt("def f(x):")[:16]
            for slot in range(b):  # one at a time: the prefill batch buckets need not include b
                engine.prefill_insert([prompt], [slot], [SamplingParams()], 1, 16)
            step_ms = median_ms(functools.partial(engine.decode, b, S), args.steps)
            cache = engine._state.cache
            rows.append({"batch": b, "slots": B, "context": S, "decode_step_ms": step_ms,
                         "cache_bytes": int(cache.k.nbytes + cache.v.nbytes)})  # fmt: skip
            del engine
    report = {"device": jax.devices()[0].device_kind, "model": model.config.name, "weights": model.weights,
              "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"device {report['device']}, model {report['model']} ({report['weights']}), context {S}")
        print("   b  slots B  cache MB  decode step ms")
        for r in rows:
            print(f"{r['batch']:>4}  {r['slots']:>7}  {r['cache_bytes'] / 1e6:8.1f}  {r['decode_step_ms']:14.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
