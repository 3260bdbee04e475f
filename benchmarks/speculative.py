"""Speculative decoding by prompt lookup (`serve --speculative-tokens K`) against plain decoding, through the real
serving path (Orchestrator over a warmed-up Engine), one request at a time: tokens/s, tokens per engine step, the
share of drafts kept, and the cost of a verify step against a decode step on this device.

    python benchmarks/speculative.py                     # the bundled demo model, K = 4
    python benchmarks/speculative.py --model tiny --tokens 2,4,8 --json
    python benchmarks/speculative.py --temperature 0.3,0.7   # seeded sampling (drafts kept with p(draft))

Prompts: code restated (the drafts come from the prompt) and a short one (any drafts come from the output).
Greedy by default (--temperature 0), --new-tokens each (ignore_eos), after a warm-up request per setting; a
sampled run uses seed 1 in both modes. The answers of both modes are compared token for token (they must be equal).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
from timing import median_ms

PROMPTS = {
    "restated-code": "def area(width, height):\n    return width * height\n\n\ndef area(width, height):\n",
    "short": "Return a new list",
}


def _engine(model, k: int, args):
    from meshserve.serving.engine import Engine
    from meshserve.serving.plan import make_plan

    plan = make_plan(model.config, max_batch=4, length_buckets=(64,), decode_buckets=(1,),
                     context_buckets=(args.context,), max_context=args.context, speculative_tokens=k)  # fmt: skip
    engine = Engine(model.params, model.config, plan)
    engine.warm_up(phases=("generate",))
    return engine


def _run(engine, model, prompt: list[int], new_tokens: int, k: int, temperature: float = 0.0) -> dict:
    from meshserve.model.sampling import SamplingParams
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.scheduler import Request, Scheduler
    from meshserve.serving.speculative import speculator_for

    speculator = speculator_for(engine.plan)
    orch = Orchestrator(engine, Scheduler.for_plan(engine.plan, 4), model.tokenizer, speculator=speculator).start()
    try:
        sampling = SamplingParams(temperature=temperature, seed=1)
        handle = orch.submit(Request(prompt, new_tokens, sampling, frozenset()))
        tokens, first = [], None
        while True:
            event = handle.events.get(timeout=300)
            if event.tokens and first is None:
                first = time.perf_counter()
            tokens += event.tokens
            if event.finish_reason is not None:
                break
        end = time.perf_counter()
    finally:
        orch.stop()
    steps = orch.steps
    return {
        "tokens": tokens,
        "decode_tokens_per_s": (len(tokens) - 1) / (end - first),
        "engine_steps": steps,
        "tokens_per_step": (len(tokens) - 1) / max(steps, 1),
        "drafts_kept": (speculator.accepted / speculator.proposed) if speculator and speculator.proposed else None,
    }


def _step_ms(engine, prompt: list[int], k: int, repeats: int = 30) -> tuple[float, float]:
    """Median ms of a b=1 decode step and a verify step of k drafts, alone."""
    from meshserve.model.sampling import SamplingParams

    engine.reset()
    engine.prefill_insert([prompt], [0], [SamplingParams()], 1, 64)
    context = engine.plan.max_context
    decode_ms = median_ms(lambda: engine.decode(1, context), repeats)
    verify_ms = median_ms(lambda: engine.verify(np.full((1, k), 5, np.int32), context), repeats)
    engine.reset()
    return decode_ms, verify_ms


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--model", help="a preset with random weights instead (e.g. tiny)")
    p.add_argument("--tokens", default="4", help="draft tokens K to try, comma-separated (default 4)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per request (default 128)")
    p.add_argument("--temperature", default="0", help="temperatures to try, comma-separated (default 0: greedy)")
    p.add_argument(
        "--context", type=int, help="the engine's context (default: 256, or the model's max_seq_len if less)"
    )
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args()
    import jax
    from meshserve.model.loading import load_model

    model = load_model(args.checkpoint, preset=args.model)
    args.context = args.context or min(256, model.config.max_seq_len)
    ks = [int(x) for x in args.tokens.split(",")]
    rows = []
    plain_engine = _engine(model, 0, args)
    temperatures = [float(x) for x in args.temperature.split(",")]
    for k in ks:
        engine = _engine(model, k, args)
        for name, text in PROMPTS.items():
            prompt = model.encode_prompt(text)[:64]
            n = min(args.new_tokens, args.context - len(prompt))
            decode_ms, verify_ms = _step_ms(engine, prompt, k)
            for t in temperatures:
                _run(plain_engine, model, prompt, 8, 0, t)  # warm the loop
                plain = _run(plain_engine, model, prompt, n, 0, t)
                _run(engine, model, prompt, 8, k, t)
                spec = _run(engine, model, prompt, n, k, t)
                rows.append({
                    "k": k, "temperature": t, "prompt": name, "new_tokens": n,
                    "same_tokens": plain["tokens"] == spec["tokens"],
                    "plain_tokens_per_s": plain["decode_tokens_per_s"], "spec_tokens_per_s": spec["decode_tokens_per_s"],
                    "speedup": spec["decode_tokens_per_s"] / plain["decode_tokens_per_s"],
                    "tokens_per_step": spec["tokens_per_step"], "drafts_kept": spec["drafts_kept"],
                    "decode_step_ms": decode_ms, "verify_step_ms": verify_ms,
                })  # fmt: skip
    report = {"device": jax.devices()[0].device_kind, "model": model.config.name, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"device {report['device']}, model {report['model']}, one request at a time")
        print(
            " K  temp  prompt         same  plain tok/s  spec tok/s  speedup  tok/step  drafts kept  decode ms  verify ms"
        )
        for r in rows:
            kept = "-" if r["drafts_kept"] is None else f"{r['drafts_kept']:.0%}"
            print(f"{r['k']:>2}  {r['temperature']:4.1f}  {r['prompt']:<13}  {'yes' if r['same_tokens'] else 'NO':<4}  "
                  f"{r['plain_tokens_per_s']:11.0f}  {r['spec_tokens_per_s']:10.0f}  {r['speedup']:6.2f}x  "
                  f"{r['tokens_per_step']:8.2f}  {kept:>11}  {r['decode_step_ms']:9.2f}  {r['verify_step_ms']:9.2f}")  # fmt: skip
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
