"""Compiling the engine's steps (serving/engine.py): one CompileJob (warm_up.py) -> its executable, stored in the
engine's table for that kind of step. Every step that takes the decode state is compiled for the state's shapes
and shardings (`Engine._abstract_state`) and donates it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from meshserve.model import transformer
from meshserve.serving.engine_steps import (
    DecodeState,
    decode_rows,
    extend_step,
    insert_rows,
    pad_sampling,
    prefill_step,
    release_slots,
    resample_rows,
    score_tokens,
    set_guides,
    verify_rows,
)
from meshserve.serving.plan import guide_buckets
from meshserve.serving.warm_up import CompileJob

if TYPE_CHECKING:
    from meshserve.serving.engine import Engine

__all__ = ["compile_job"]


def compile_job(
    engine: Engine, job: CompileJob, state: DecodeState, progress: Callable[[CompileJob], None] | None
) -> None:
    """Compile `job` for `engine` and store it; then progress(job)."""
    spec = jax.ShapeDtypeStruct
    # Each sampling array's shape as stack_sampling builds it ([b], seed [b, 2], bias table [b, L_MAX]), b rows.
    V = engine.config.vocab_size
    samp = lambda b: {n: spec((b, *a.shape[1:]), a.dtype) for n, a in pad_sampling([], b, V).items()}  # noqa: E731
    key = job.key
    rows = lambda b: spec((b,), jnp.int32)  # noqa: E731
    if job.kind == "release":
        release = jax.jit(release_slots, donate_argnums=0, out_shardings=engine.steps.decode_state_sharding)
        engine._release = release.lower(state, spec((engine.plan.max_batch,), jnp.bool_)).compile()
        # Guided decoding's mask writes, one per row bucket (the masks of the guided rows of a step).
        guide = jax.jit(set_guides, donate_argnums=0, out_shardings=engine.steps.decode_state_sharding)
        words = state.sampling["allowed"].shape[1]
        engine._guide = {
            (g,): guide.lower(state, rows(g), spec((g, words), jnp.uint32)).compile()
            for g in guide_buckets(engine.plan.max_batch)
        }

    elif job.kind in ("prefill", "score", "extend"):
        b, t = key[:2]
        tokens = spec((b, t), jnp.int32)
        if job.kind == "score":
            engine._score[key] = (
                jax.jit(functools.partial(score_tokens, engine.steps, engine.config))
                .lower(engine.params, tokens, rows(b))
                .compile()
            )
        elif job.kind == "extend":
            extend = jax.jit(
                functools.partial(extend_step, engine.steps, engine.config),
                donate_argnums=1,
                out_shardings=(engine.steps.decode_state_sharding, None),
            )
            prefix = spec((b, key[2]), jnp.int32)
            engine._extend[key] = extend.lower(
                engine.params, state, tokens, rows(b), prefix, rows(b), rows(b), rows(b), samp(b)
            ).compile()
        else:
            kv = spec(
                (engine.config.n_layers, b, t, engine.config.n_kv_heads, engine.config.d_head),
                transformer.compute_dtype(engine.params),
            )
            in_prompt = spec((b, engine.config.vocab_size), jnp.bool_)
            insert = jax.jit(
                functools.partial(insert_rows, engine.steps.insert),
                donate_argnums=0,
                out_shardings=engine.steps.decode_state_sharding,
            )
            # The insert first: a prefill bucket is looked up only once both of its steps are in.
            engine._insert[key] = insert.lower(state, kv, kv, rows(b), rows(b), rows(b), samp(b), in_prompt).compile()
            engine._prefill[key] = (
                jax.jit(functools.partial(prefill_step, engine.steps, engine.config, int8_kv=engine.int8_kv))
                .lower(engine.params, tokens, rows(b), samp(b))
                .compile()
            )
    elif job.kind == "resample":  # guided rows' masks written after their step was dispatched, rows drawn again
        (g,) = key
        fn = jax.jit(resample_rows, donate_argnums=0, out_shardings=(engine.steps.decode_state_sharding, None))
        words = state.sampling["allowed"].shape[1]
        engine._resample[key] = fn.lower(state, rows(g), spec((g, words), jnp.uint32)).compile()
    elif job.kind == "decode":
        b, c = key
        fn = jax.jit(functools.partial(decode_rows, engine.steps, engine.config, b, c), donate_argnums=1)
        engine._decode[key] = fn.lower(engine.params, state).compile()
    elif job.kind == "verify":
        b, c = key
        fn = jax.jit(functools.partial(verify_rows, engine.steps, engine.config, b, c), donate_argnums=1,
                     out_shardings=(engine.steps.decode_state_sharding, None))  # fmt: skip
        drafts = spec((b, engine.plan.speculative_tokens), jnp.int32)
        engine._verify[key] = fn.lower(engine.params, state, drafts).compile()
    else:
        raise ValueError(f"unknown step kind {job.kind!r}")
    if progress:
        progress(job)
