"""Guided decoding (response_format json_object / json_schema) against free text, through the real serving path
(Orchestrator over a warmed-up Engine): decode tokens/s of a batch, wall time per engine step, and the
engine thread's host time per guided token (moving each guide past its token, its next mask, the masks' write into
the decode state). Guided rows end when their JSON is complete, so a guided batch shrinks sooner than a free one:
tokens/s compares whole runs, ms/step compares steps.

    python benchmarks/guided.py                          # the bundled demo model, batches of 1 and 8
    python benchmarks/guided.py --model tiny --batch 1,4 --json

Per batch size, three runs of the same prompts: all free, all guided by json_object, all guided by a small schema;
and one with a single guided row among free ones. Each guided setting runs once per way in --ways (GuideTracker's
docstring): "pipelined" (steps dispatched before the previous one is read, guided rows sampled again once their
masks are known), "read-first" (the previous step read and the masks written before each dispatch) and "auto"
(what a server does: whichever it has timed faster). Sampled (temperature 0.8, seed i per row), --new-tokens at
most; a guided row ends when its JSON is complete, so rows finish at different times: tokens/s counts the tokens
every row generated over the wall time from submission to the last row's end (prefill included), median of
--repeats runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "args": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 4},
        "pure": {"type": "boolean"},
    },
    "required": ["name", "args", "pure"],
}
PROMPT = "Describe the function as JSON: def area(width, height): return width * height\n"


def _run(orch, model, batch: int, new_tokens: int, guides: list) -> dict:
    """One batch through the orchestrator: -> tokens generated, seconds, guided tokens, finish reasons."""
    from meshserve.model.sampling import SamplingParams
    from meshserve.serving.scheduler import Request

    prompt = model.encode_prompt(PROMPT)
    stops = frozenset(model.stop_ids())
    before = (orch.guides.tokens, orch.guides.seconds, orch.steps)
    start = time.perf_counter()
    handles = [
        orch.submit(Request(prompt, new_tokens, SamplingParams(temperature=0.8, seed=i), stops, guide=guides[i]))
        for i in range(batch)
    ]
    reasons = []
    for h in handles:
        while (event := h.events.get(timeout=600)).finish_reason is None:
            pass
        reasons.append(event.finish_reason)
    seconds = time.perf_counter() - start
    return {
        "tokens": sum(len(h.request.tokens) for h in handles),
        "seconds": seconds,
        "guided_tokens": orch.guides.tokens - before[0],
        "host_seconds": orch.guides.seconds - before[1],
        "stopped": sum(r == "stop" for r in reasons),
        "steps": orch.steps - before[2],
    }


def _setting(orch, model, b: int, new_tokens: int, guides: list, repeats: int, name: str) -> dict:
    """One row of the table: a warm-up run, then `repeats` timed runs of the same requests."""
    _run(orch, model, b, 8, guides)  # warm: the first masks of each grammar state are cached after it
    runs = [_run(orch, model, b, new_tokens, guides) for _ in range(repeats)]
    rate = statistics.median(r["tokens"] / r["seconds"] for r in runs)
    guided = sum(r["guided_tokens"] for r in runs)
    host_ms = 1e3 * sum(r["host_seconds"] for r in runs) / guided if guided else None
    # Wall time per engine step (prefill included): a guided step's mask work happens after the step's own timing
    # ends, so the loop's step timer would hide it.
    step_ms = 1e3 * sum(r["seconds"] for r in runs) / max(1, sum(r["steps"] for r in runs))
    return {"batch": b, "rows": name, "tokens_per_s": rate, "step_ms": step_ms, "host_ms_per_guided_token": host_ms,
            "tokens": runs[0]["tokens"], "stopped": runs[0]["stopped"]}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="checkpoint (default: the bundled demo model)")
    p.add_argument("--model", help="a preset with random weights instead (e.g. tiny)")
    p.add_argument("--batch", default="1,8", help="batch sizes, comma-separated (default 1,8)")
    p.add_argument("--new-tokens", type=int, default=128, help="most tokens per request (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the median is shown (default 3)")
    p.add_argument("--ways", default="pipelined,read-first,auto",
                   help="how guided steps run: pipelined, read-first, auto (default: all three)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = p.parse_args()
    ways = {"pipelined": True, "read-first": False, "auto": None}
    if unknown := set(args.ways.split(",")) - set(ways):
        p.error(f"--ways: unknown {sorted(unknown)}; choose from {', '.join(ways)}")
    import jax
    from meshserve.model.generate import bucket
    from meshserve.model.loading import load_model
    from meshserve.serving.engine import Engine
    from meshserve.serving.guided import GuideSpec
    from meshserve.serving.guided.tracker import PipelineChoice
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.plan import make_plan
    from meshserve.serving.scheduler import Scheduler

    model = load_model(args.checkpoint, preset=args.model)
    batches = [int(x) for x in args.batch.split(",")]
    context = min(256, model.config.max_seq_len)
    prompt_bucket = bucket(len(model.encode_prompt(PROMPT)))  # a byte tokenizer (presets) makes ~80 tokens of it
    plan = make_plan(model.config, max_batch=max(batches), length_buckets=(prompt_bucket,),
                     decode_buckets=tuple(batches), context_buckets=(context,), max_context=context)  # fmt: skip
    engine = Engine(model.params, model.config, plan)
    engine.warm_up(phases=("generate",))
    orch = Orchestrator(engine, Scheduler.for_plan(plan, 2 * max(batches)), model.tokenizer).start()
    kinds = {
        "free": None,
        "json_object": GuideSpec("json_object"),
        "json_schema": GuideSpec("json_schema", schema=json.dumps(SCHEMA)),
    }
    new_tokens = min(args.new_tokens, context - len(model.encode_prompt(PROMPT)))
    rows = []
    try:
        for b in batches:
            settings = [(name, [spec] * b) for name, spec in kinds.items()]
            if b > 1:
                settings.append(("1 json_schema + free", [kinds["json_schema"]] + [None] * (b - 1)))
            for name, guides in settings:
                for way in [None] if name == "free" else args.ways.split(","):
                    if way is not None:
                        orch.guides.choice = PipelineChoice(ways[way])  # fresh timings for auto
                    label = name if way is None else f"{name}, {way}"
                    rows.append(_setting(orch, model, b, new_tokens, guides, args.repeats, label))
                    if way == "auto":  # the way it settled on (the faster one as timed)
                        settled = orch.guides.choice.faster(b)
                        rows[-1]["rows"] += f" ({'pipelined' if settled else 'read-first'})"
    finally:
        orch.stop()
    for r in rows:
        free = next(f for f in rows if f["batch"] == r["batch"] and f["rows"] == "free")
        r["vs_free"] = r["tokens_per_s"] / free["tokens_per_s"]
    report = {"device": jax.devices()[0].device_kind, "model": model.config.name, "vocab": model.config.vocab_size,
              "new_tokens": new_tokens, "rows": rows}  # fmt: skip
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"device {report['device']}, model {report['model']} (V={report['vocab']}), up to {new_tokens} tokens a row")
    print(f"{'batch':>5}  {'rows':<40}  tokens/s  vs free  ms/step  host ms/guided token  tokens (run 1)  "
          "JSON complete")  # fmt: skip
    for r in rows:
        host = "-" if r["host_ms_per_guided_token"] is None else f"{r['host_ms_per_guided_token']:.3f}"
        print(f"{r['batch']:>5}  {r['rows']:<40}  {r['tokens_per_s']:8.0f}  {r['vs_free']:6.2f}x  "
              f"{r['step_ms']:7.2f}  {host:>20}  {r['tokens']:>14}  {r['stopped']:>13}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
