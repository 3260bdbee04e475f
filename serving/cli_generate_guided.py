"""`meshserve generate --json-object / --json-schema FILE` in process: guided decoding needs the host between decode
steps (each guided row's next token mask follows its last token), which model.generate's on-device loop never
visits, so these prompts run through the serving engine instead: an Engine compiled for exactly this batch (one
prefill bucket, one decode bucket, one context) under an Orchestrator, as `meshserve serve` would run them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from meshserve.errors import UserError
from meshserve.model.sampling_params import SamplingParams
from meshserve.serving.guided import GuideSpec

__all__ = ["generate_guided"]


def generate_guided(
    model,
    prompts: Sequence[list[int]],
    sampling: Sequence[SamplingParams],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    spec: GuideSpec,
    status: Callable[[str], None],
) -> list[tuple[list[int], list[float], str, list]]:
    """Generate for every prompt (row i with sampling[i]) under the format `spec`: per row (tokens, log-probs,
    finish reason, top log-probs as (ids, log-probs) per token). UserError for a prompt the model cannot take."""
    from meshserve.model.generate import bucket, prompt_error
    from meshserve.serving.engine import Engine
    from meshserve.serving.guided import compile_spec
    from meshserve.serving.orchestrator import Orchestrator
    from meshserve.serving.plan import make_plan
    from meshserve.serving.scheduler import Request, Scheduler

    compile_spec(spec)  # a schema it cannot follow is refused before anything compiles
    config = model.config
    for i, p in enumerate(prompts):
        if error := prompt_error(config, p, max_new_tokens, f"prompt {i}"):
            raise UserError(error)
    rows, longest = len(prompts), max(map(len, prompts))
    context = min(config.max_seq_len, bucket(longest + max_new_tokens))
    length = min(bucket(longest), context)
    plan = make_plan(config, max_batch=rows, max_context=context, length_buckets=(length,), decode_buckets=(rows,),
                     context_buckets=(context,))  # fmt: skip
    engine = Engine(model.params, config, plan)
    status(f"compiling the serving engine for {rows} guided row{'s' * (rows > 1)} ...")
    engine.warm_up(phases=("generate",))
    status("generating ...")
    orch = Orchestrator(engine, Scheduler.for_plan(plan, rows), model.tokenizer).start()
    try:
        requests = [Request(list(p), max_new_tokens, s, frozenset(stop_ids), guide=spec)
                    for p, s in zip(prompts, sampling, strict=True)]  # fmt: skip
        handles = [orch.submit(r) for r in requests]
        out = []
        for h in handles:
            while (event := h.events.get()) is not None:
                if isinstance(event, BaseException):
                    raise event
                if event.finish_reason is not None:
                    break
            r = h.request
            out.append((list(r.tokens), list(r.logprobs), event.finish_reason, list(r.top_logprobs)))
        return out
    finally:
        orch.stop()
