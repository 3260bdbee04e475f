"""Train the bundled demo model (model/demo/) on text every Python install has.

    python -m meshserve.model.demo_train            # ~25 min on 2 CPU cores; writes model/demo/

Corpus and tokenizer: model/demo_corpus.py (the standard library's own documentation, a fixed held-out split,
a byte-level BPE tokenizer with <pad>/<bos>/<eos> at ids 0/1/2).

Model: the `demo` preset, trained with optax AdamW (warmup + cosine) on next-token cross-entropy. The
forward pass is `transformer.prefill(..., all_logits=True)` in float32, the very code that serves, so
there is no second model to drift. Saved in bf16 with `checkpoint.save_checkpoint`.

Shapes: B rows, T tokens per row, V vocab (alphabet of model/config.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from meshserve.model.demo_corpus import (
    PAD,
    pack,
    split_documents,
    stdlib_documents,
    train_tokenizer,
)

__all__ = ["evaluate", "train", "main"]


def _loss_fn(params, config, rows):
    """Mean next-token cross-entropy over real (non-pad) targets. rows: int32 [B, T+1]."""
    import jax
    import jax.numpy as jnp
    from meshserve.model import transformer

    x, y = rows[:, :-1], rows[:, 1:]
    B, T = x.shape
    logits, _, _ = transformer.prefill(params, config, x, jnp.full((B,), T, jnp.int32), all_logits=True)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), y[..., None], axis=-1)[..., 0]  # [B, T]
    real = (y != PAD).astype(jnp.float32)
    return jnp.sum(nll * real) / jnp.maximum(jnp.sum(real), 1.0)


@functools.cache
def _eval_step(config):
    """A jitted (params, rows [B, T+1]) -> (nll [B, T], argmax [B, T]), compiled once per config and shape."""
    import jax
    import jax.numpy as jnp
    from meshserve.model import transformer

    @jax.jit
    def step(params, rows):
        x, y = rows[:, :-1], rows[:, 1:]
        B, T = x.shape
        logits, _, _ = transformer.prefill(params, config, x, jnp.full((B,), T, jnp.int32), all_logits=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        return nll, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    return step


def evaluate(params, config, rows: np.ndarray, batch: int = 8) -> dict[str, np.ndarray | float]:
    """Held-out statistics. rows: int32 [R, T+1].

    Returns {"perplexity": exp(mean NLL over real targets), "tokens": count, "argmax": int32 [R, T] top-1
    predictions, "real": bool [R, T] which targets are real}. The compute dtype follows the weights.
    """
    step = _eval_step(config)
    nlls, preds = [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        pad = batch - len(chunk)  # keep one compiled shape: pad the last chunk with pad rows, dropped below
        full = np.concatenate([chunk, np.full((pad, rows.shape[1]), PAD, np.int32)]) if pad else chunk
        nll, pred = step(params, full)
        nlls.append(np.asarray(nll)[: len(chunk)])
        preds.append(np.asarray(pred)[: len(chunk)])
    nll, pred = np.concatenate(nlls), np.concatenate(preds)
    real = rows[:, 1:] != PAD
    return {
        "perplexity": float(np.exp(nll[real].astype(np.float64).mean())),
        "tokens": int(real.sum()),
        "argmax": pred,
        "real": real,
    }


def lr_at(progress: float, peak: float, warmup: float = 0.05, final: float = 0.05) -> float:
    """Learning rate at `progress` in [0, 1] of the budget: linear warmup, then cosine down to final * peak."""
    if progress < warmup:
        return peak * progress / warmup
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * t)))


def train(
    config,
    rows: np.ndarray,
    *,
    minutes: float,
    max_steps: int | None,
    batch: int,
    lr: float,
    seed: int,
    val_rows: np.ndarray | None = None,
    evals: int = 6,
) -> tuple[dict, dict]:
    """AdamW with warmup + cosine on random batches of `rows` [R, T+1]; float32 weights.

    The schedule runs over a wall-clock budget (`minutes`), or over `max_steps` when given: the CPUs this
    trains on are shared, so a step count cannot promise a finish time, and a cosine cut off early leaves
    the learning rate high. `evals` times over the run (and at the end) the validation perplexity is
    measured on `val_rows` and the best weights so far are kept: the corpus is small (~0.5 M tokens).
    Returns (best params, log with per-step losses and learning rates and the validation curve).
    """
    import jax
    import jax.numpy as jnp
    import optax
    from meshserve.model.params import init_params
    from meshserve.progress import progress as progress_bar  # `progress` below is the share of the run done

    params = init_params(config, jax.random.key(seed), jnp.float32)
    # Decay matrices only: norm scales (1-D per layer, 2-D when stacked [N, E]) stay undecayed.
    decay_mask = jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and "norm" not in jax.tree_util.keystr(path), params
    )
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),  # early steps on a fresh model can spike; clipping keeps them sane
        optax.inject_hyperparams(optax.adamw)(learning_rate=0.0, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask),
    )
    opt_state = opt.init(params)

    @jax.jit
    def update(params, opt_state, batch_rows, learning_rate):
        opt_state[1].hyperparams["learning_rate"] = learning_rate
        loss, grads = jax.value_and_grad(_loss_fn)(params, config, batch_rows)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    log: dict = {"loss": [], "lr": [], "val": []}
    best = (math.inf, params, 0)
    start = time.monotonic()
    next_eval = 1.0 / evals
    with progress_bar("train", "step", max_steps or None, dynamic_ncols=True) as bar:  # a log gets lines, not redraws
        step = 0
        while True:
            progress = step / max_steps if max_steps else (time.monotonic() - start) / (60 * minutes)
            if progress >= 1.0:
                break
            rate = lr_at(progress, lr)
            idx = rng.integers(0, len(rows), batch)
            params, opt_state, loss = update(params, opt_state, jnp.asarray(rows[idx]), jnp.float32(rate))
            log["loss"].append(float(loss))
            log["lr"].append(rate)
            step += 1
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(log['loss'][-10:]):.3f}", lr=f"{rate:.2e}", done=f"{progress:.0%}")
            done = (step / max_steps if max_steps else (time.monotonic() - start) / (60 * minutes)) >= 1.0
            if val_rows is not None and (progress >= next_eval or done):
                next_eval += 1.0 / evals
                ppl = evaluate(params, config, val_rows)["perplexity"]
                log["val"].append((step, ppl))
                bar.write(
                    f"step {step}: train loss {np.mean(log['loss'][-50:]):.3f}, validation ppl {ppl:.2f}",
                    file=sys.stderr,
                )
                if ppl < best[0]:
                    best = (ppl, jax.device_get(params), step)
    log["best_step"] = best[2] if val_rows is not None else step
    return (best[1] if val_rows is not None else params), log


def main(argv: list[str] | None = None) -> int:
    from meshserve.model.loading import DEMO_CHECKPOINT

    parser = argparse.ArgumentParser(prog="python -m meshserve.model.demo_train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_CHECKPOINT, help="checkpoint directory (default: %(default)s)")
    parser.add_argument("--preset", default="demo", help="model preset (default: demo)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per training row (default 256)")
    parser.add_argument("--batch", type=int, default=8, help="rows per step (default 8)")
    parser.add_argument(
        "--minutes", type=float, default=22.0, help="training budget in wall-clock minutes (default 22)"
    )
    parser.add_argument("--steps", type=int, help="a fixed number of steps instead of --minutes (reproducible)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (default 2e-3)")
    parser.add_argument("--val-rows", type=int, default=48, help="validation rows used to pick the best step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="build corpus and tokenizer, report sizes, no training")
    parser.add_argument("--json", action="store_true", help="print the final statistics as one JSON line")
    args = parser.parse_args(argv)

    from meshserve.model.config import get_config
    from meshserve.model.tokenizer import HFTokenizer

    config = get_config(args.preset)
    t0 = time.monotonic()
    train_docs, val_docs, heldout_docs = split_documents(stdlib_documents())
    chars = [sum(len(d.text) for d in docs) / 1e6 for docs in (train_docs, val_docs, heldout_docs)]
    print(
        f"corpus: {len(train_docs)} train / {len(val_docs)} validation / {len(heldout_docs)} held-out documents, "
        f"{chars[0]:.2f} / {chars[1]:.2f} / {chars[2]:.2f} M characters",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(tmp) / "tokenizer.json"
        train_tokenizer(train_docs, config.vocab_size, tok_path)
        tokenizer = HFTokenizer(tok_path)
        train_rows = pack(train_docs, tokenizer, args.seq_len)
        val_rows = pack(val_docs, tokenizer, args.seq_len)
        eval_rows = pack(heldout_docs, tokenizer, args.seq_len)
        print(
            f"tokens: {train_rows.size / 1e6:.2f} M train ({len(train_rows)} rows of {args.seq_len + 1}), "
            f"{eval_rows.size / 1e6:.3f} M held-out; one epoch = {len(train_rows) / args.batch:.0f} steps",
            file=sys.stderr,
        )
        if args.dry_run:
            return 0
        params, log = train(
            config,
            train_rows,
            minutes=args.minutes,
            max_steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            val_rows=val_rows[: args.val_rows],
        )
        from meshserve.model.checkpoint import save_checkpoint
        from meshserve.model.params import cast_params

        bf16 = cast_params(config, params, "bf16")
        save_checkpoint(args.out, config, bf16, "bf16", tok_path, overwrite=True)
    stats = {
        "steps": len(log["loss"]),
        "best_step": log["best_step"],
        "train_loss_last50": float(np.mean(log["loss"][-50:])),
        "train_loss_at_best50": float(np.mean(log["loss"][max(0, log["best_step"] - 50) : log["best_step"]])),
        "validation_ppl": min(v for _, v in log["val"]),
        "heldout_tokens": int((eval_rows[:, 1:] != PAD).sum()),
        "heldout_ppl_f32": evaluate(params, config, eval_rows)["perplexity"],
        "heldout_ppl_bf16": evaluate(bf16, config, eval_rows)["perplexity"],
        "heldout_ppl_int8": evaluate(cast_params(config, bf16, "int8"), config, eval_rows)["perplexity"],
        "wall_minutes": (time.monotonic() - t0) / 60,
        "checkpoint_mb": sum(p.stat().st_size for p in Path(args.out).rglob("*") if p.is_file()) / 1e6,
    }
    print(
        json.dumps(stats)
        if args.json
        else "\n".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items())
    )
    return 0 if math.isfinite(stats["heldout_ppl_bf16"]) else 1


if __name__ == "__main__":
    sys.exit(main())
