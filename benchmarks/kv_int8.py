"""What the int8 KV cache (`serve --kv-cache-dtype int8`, model/kv_quant.py) costs in accuracy and saves in memory.

    python benchmarks/kv_int8.py                      # the bundled demo model, its held-out documents
    python benchmarks/kv_int8.py --rows 64 --json

Accuracy: held-out documents the demo model never trained on, teacher-forced (each position's next-token
distribution given the true text before it), once with the keys and values as the compute dtype keeps them and once
rounded to the int8 cache's grid: what a decode step over an int8 cache computes at every position (prefill rounds
its keys as the cache stores them; tests/test_kv_int8.py checks the two agree). Reported: mean negative log-likelihood
(nats per token) and perplexity of both, the largest and mean |difference| of the true token's log-prob, and how often
the most likely next token is the same (greedy decoding's choice at each position).
Memory: the decode state's KV cache bytes for the plan's slots and context (the engine's own abstract state).
Speed is `meshserve bench --kv-cache-dtype auto,int8` (BENCHMARKS.md, BUILD.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a meshserve checkpoint (default: the bundled demo model)")
    p.add_argument("--weights", choices=["f32", "bf16", "int8"], default=None, help="default: the checkpoint's")
    p.add_argument("--rows", type=int, default=32, help="held-out rows of --seq-len + 1 tokens (default 32)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per row (default 256)")
    p.add_argument("--batch", type=int, default=8, help="rows per compiled call (default 8)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    if args.rows < 1 or args.batch < 1 or args.seq_len < 2:
        p.error("--rows and --batch must be >= 1, --seq-len >= 2")

    import jax
    import jax.numpy as jnp
    from meshserve.model import transformer
    from meshserve.model.demo_corpus import heldout_rows
    from meshserve.model.loading import load_model
    from meshserve.progress import progress
    from meshserve.serving.engine import Engine
    from meshserve.serving.memory_fit import state_bytes_per_device
    from meshserve.serving.plan import make_plan

    model = load_model(args.checkpoint, weights=args.weights)
    config = model.config
    seq = min(args.seq_len, config.max_seq_len)
    rows = heldout_rows(model.tokenizer, seq, args.rows)  # [R, seq + 1]
    rows = rows[: len(rows) // args.batch * args.batch] if len(rows) >= args.batch else rows

    @functools.partial(jax.jit, static_argnames="int8_kv")
    def logprobs(params, tokens, int8_kv):
        """tokens [b, seq + 1] -> log p(true next token) [b, seq] and the argmax [b, seq]."""
        inputs = tokens[:, :-1]
        lengths = jnp.full((inputs.shape[0],), inputs.shape[1], jnp.int32)
        logits, _, _ = transformer.prefill(params, config, inputs, lengths, all_logits=True, int8_kv=int8_kv)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0], jnp.argmax(lp, axis=-1)

    out = {name: ([], []) for name in ("auto", "int8")}
    starts = range(0, len(rows), args.batch)
    with progress("teacher-forced rows", "batch", len(starts), disable=args.json) as bar:
        for start in starts:
            batch = jnp.asarray(rows[start : start + args.batch])
            for name in out:
                lp, best = jax.device_get(logprobs(model.params, batch, int8_kv=name == "int8"))
                out[name][0].append(lp)
                out[name][1].append(best)
            bar.update(1)
    mask = rows[:, 1:] != 0  # true next tokens that are not padding
    lp = {n: np.concatenate(v[0])[mask] for n, v in out.items()}
    best = {n: np.concatenate(v[1])[mask] for n, v in out.items()}
    diff = np.abs(lp["int8"] - lp["auto"])
    plan = make_plan(config)
    kv_bytes = {}
    for name in ("auto", "int8"):
        engine = Engine(model.params, config, make_plan(config, kv_cache_dtype=name))
        kv_bytes[name] = state_bytes_per_device(engine._abstract_state().cache)
    report = {
        "model": model.source,
        "weights": model.weights,
        "tokens": int(mask.sum()),
        "nll_auto": float(-lp["auto"].mean()),
        "nll_int8": float(-lp["int8"].mean()),
        "perplexity_auto": float(np.exp(-lp["auto"].mean())),
        "perplexity_int8": float(np.exp(-lp["int8"].mean())),
        "max_abs_logprob_diff": float(diff.max()),
        "mean_abs_logprob_diff": float(diff.mean()),
        "argmax_agreement": float((best["auto"] == best["int8"]).mean()),
        "max_batch": plan.max_batch,
        "max_context": plan.max_context,
        "kv_cache_bytes_auto": int(kv_bytes["auto"]),
        "kv_cache_bytes_int8": int(kv_bytes["int8"]),
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{report['model']} ({report['weights']}), {report['tokens']} held-out tokens, teacher-forced")
    print(f"  nll      auto {report['nll_auto']:.4f}  int8 {report['nll_int8']:.4f} nats/token "
          f"(perplexity {report['perplexity_auto']:.3f} -> {report['perplexity_int8']:.3f})")  # fmt: skip
    print(
        f"  |d log p(true token)|  max {report['max_abs_logprob_diff']:.4f}  mean {report['mean_abs_logprob_diff']:.5f}"
    )
    print(f"  same argmax at {report['argmax_agreement']:.2%} of positions")
    print(f"  KV cache for {plan.max_batch} slots x {plan.max_context} tokens: {kv_bytes['auto'] / 2**20:.2f} MiB -> "
          f"{kv_bytes['int8'] / 2**20:.2f} MiB")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
