"""Benchmark of the decoder's two phases on the local device: prefill time and MFU, decode step time and HBM use.

One row per (weights, KV cache dtype, batch): the prompt batch [B, P] is prefilled, inserted into a decode cache of
P + G slots (the compute dtype, or int8: model/kv_quant.py) and
decoded for G steps by an on-device loop (the same `transformer.decode_step` and `sampling.sample` the engine runs;
greedy). Figures:
  decode_step_ms   wall time of the G-step loop / G
  hbm_gbps         bytes a step must move (all weights once + the KV cache read at the mean context P + (G + 1) / 2,
                   in its storage: 2 bytes per element in bf16, 1 + 1/Q in int8) / step time
  hbm_fraction     hbm_gbps / the device's measured copy bandwidth (read + write of a large buffer); read_gbps,
                   a read-only stream's bandwidth, is reported beside it (a decode step mostly reads)
  prefill_mfu      2 · N_params · B · P / (prefill time · peak bf16 FLOP/s), PAPER.md's MFU (N_params: the model's
                   own, as `meshserve analyze` counts them; None where the chip table has no peak, e.g. a CPU)
  prefill_ms       the jitted prefill alone: prompts [B, P] -> last-token logits and k, v
  ttft_ms          prefill + writing k, v into a fresh decode cache + sampling the first token, as a request sees
                   it (no queueing): the same prefill plus more work, so ttft_ms >= prefill_ms up to timing noise
Every figure is the median of --repeats timed runs. prefill and ttft are timed in interleaved rounds (prefill, ttft,
prefill, ttft, ...) after two untimed rounds: timed back to back with one warm-up each, whichever ran first after
compilation read slow (tiny, 120-token prompt, CPU: prefill 2.0 ms, ttft 1.4 ms; swap the order and it swaps), which
is how ttft once came out below the prefill it contains.
On a CPU, hbm_fraction compares unlike things: a small model's weights and KV cache (tiny: ~0.2 MiB) stay in the
CPU caches between steps, while the copy figure streams 128 MiB through DRAM with a bf16 add that is itself partly
compute-bound; it can exceed 100% there and is not a bandwidth ceiling (the table says so under the rows).
The peer (optional) is Hugging Face transformers' `generate` on the same shapes (Falcon-style models only), run in
the same process after meshserve's rows, so the ratio is measured side by side.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from meshserve.analytics.sizes import model_sizes
from meshserve.errors import UserError
from meshserve.model import transformer
from meshserve.model.config import ModelConfig
from meshserve.model.decode_attention import decode_attention_label
from meshserve.model.decode_norm import decode_norm_label
from meshserve.model.kv_quant import bytes_per_element, check_kv_cache_dtype
from meshserve.model.params import Params, cast_params, init_params, params_nbytes, unstack_layers
from meshserve.model.quant import int8_matmul_label, int8_rows_layout
from meshserve.model.sampling import SamplingParams, sample, stack_sampling
from meshserve.serving.bandwidth import measure_copy_bandwidth, measure_read_bandwidth

__all__ = [
    "BenchRow",
    "run_bench",
    "measure_copy_bandwidth",
    "measure_read_bandwidth",
    "device_peak_flops",
    "peer_row",
]


@dataclass
class BenchRow:
    model: str
    weights: str
    kv_cache_dtype: str  # "auto" (the compute dtype) or "int8"
    batch: int
    prompt_len: int
    gen_len: int
    layers: str  # "scan" (stacked weights, lax.scan) or "unrolled"
    int8_matmul: str  # "xla" (convert + GEMM), "pallas" (model/int8_kernel.py), "pallas-tuned" (with a tuning file)
    # or "w8a8" (int8 activations too: model/quant.py)
    decode_attention: str  # "xla", "pallas" (model/decode_attention.py's kernel on a CUDA GPU) or "pallas-interpret"
    device: str
    prefill_ms: float
    ttft_ms: float
    decode_step_ms: float | None
    tokens_per_s: float | None
    hbm_bytes_per_step: int
    hbm_gbps: float | None
    copy_gbps: float
    hbm_fraction: float | None
    prefill_mfu: float | None
    peak_memory_bytes: int | None
    peer_decode_step_ms: float | None = None
    peer_tokens_per_s: float | None = None
    peer_prefill_ms: float | None = None
    speedup_vs_peer: float | None = None
    read_gbps: float | None = None  # read-only stream bandwidth of the device (measure_read_bandwidth)
    platform: str = ""  # jax platform (cpu, gpu, tpu): on cpu hbm_fraction is not a bandwidth fraction (module doc)
    # The decode step's norms: "xla", or model/decode_norm.py's kernel ("pallas" on CUDA, "pallas-interpret")
    decode_norm: str = "xla"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _timed_together(fns: Sequence[Callable[[], Any]], repeats: int, warmup: int = 2) -> list[float]:
    """Median wall seconds of each fn() (its result blocked on), timed in `repeats` interleaved rounds after `warmup`
    untimed rounds, so every figure sees the same background load and the same warm state (see the module doc)."""
    for _ in range(warmup):
        for fn in fns:
            jax.block_until_ready(fn())
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            jax.block_until_ready(fn())
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def device_peak_flops() -> tuple[str, float | None]:
    """(device kind, datasheet bf16 peak FLOP/s from analytics' chip table, or None when the chip is not in it)."""
    from meshserve.analytics.chips import chip_for_device, get_chip

    kind = jax.devices()[0].device_kind
    chip = chip_for_device(kind)
    return kind, get_chip(chip).peak_flops_bf16 if chip else None


def _compiled_peak(compiled: Any) -> int:
    """Device bytes a compiled step needs at its peak (arguments, outputs and temporaries), per the compiler."""
    m = compiled.memory_analysis()
    if m is None:
        return 0
    peak = getattr(m, "peak_memory_in_bytes", 0)
    return int(peak or m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def make_params(config: ModelConfig, weights: str, seed: int = 0) -> Params:
    """Random weights made on the device in their storage dtype (no float32 copy of the model is ever held)."""
    make = jax.jit(lambda key: cast_params(config, init_params(config, key, jnp.bfloat16), weights))
    return make(jax.random.key(seed))


def bench_params(config: ModelConfig, weights: str, layers: str, *, consume: bool = False) -> Params:
    """The weights a bench row runs: `make_params`, and for unrolled layers per-layer trees (int8 stored
    contracted-axes-last under rowsum and w8a8: `quant.int8_rows_layout`). consume: unstack deleting each stacked
    array as it is sliced (not under jax.eval_shape, which benchmarks/decode_hlo.py uses)."""
    params = make_params(config, weights)
    if layers != "unrolled":
        return params
    return unstack_layers(params, consume=consume, int8_rows=int8_rows_layout())


def bench_inputs(config: ModelConfig, batch: int, prompt_len: int) -> tuple[jax.Array, jax.Array, dict]:
    """A row's inputs: random prompt tokens int32 [B, P] (seed 0), their lengths int32 [B] (all P), and greedy
    sampling rows (`stack_sampling` of default SamplingParams, as arrays)."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (batch, prompt_len)), jnp.int32)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    sampling = {k: jnp.asarray(v) for k, v in stack_sampling([SamplingParams()] * batch).items()}
    return tokens, lengths, sampling


_prefill = jax.jit(transformer.prefill, static_argnames=("config", "all_logits"))


@partial(jax.jit, static_argnames=("config", "context", "int8_kv"))
def _prefill_and_insert(params, config, tokens, lengths, sampling, context, int8_kv=False):
    logits, k, v = transformer.prefill(params, config, tokens, lengths, int8_kv=int8_kv)
    cache = transformer.init_cache(config, tokens.shape[0], context, jnp.int8 if int8_kv else k.dtype)
    cache = transformer.insert(cache, k, v, lengths, jnp.arange(tokens.shape[0]))
    first, _ = sample(logits, sampling, jnp.int32(0))
    return first, cache


@partial(jax.jit, static_argnames=("config", "steps"), donate_argnames=("cache",))
def _decode_loop(params, config, first, cache, sampling, steps):
    def body(step, state):
        last, cache = state
        logits, cache = transformer.decode_step(params, config, last, cache)
        tok, _ = sample(logits, sampling, step)
        return tok, cache

    return jax.lax.fori_loop(1, steps + 1, body, (first, cache))


def bench_row(
    params: Params,
    config: ModelConfig,
    weights: str,
    batch: int,
    prompt_len: int,
    gen_len: int,
    copy_bw: float,
    peak_flops: float | None,
    layers: str,
    repeats: int = 3,
    read_bw: float | None = None,
    kv_cache_dtype: str = "auto",
) -> BenchRow:
    """Measure one (weights, KV cache dtype, batch) point; see the module docstring for each figure."""
    tokens, lengths, sampling = bench_inputs(config, batch, prompt_len)
    context = prompt_len + max(gen_len, 1)

    # Compile ahead of time: one compile per function, and the compiler's own peak-memory figure.
    prefill_c = _prefill.lower(params, config, tokens, lengths).compile()
    int8_kv = kv_cache_dtype == "int8"
    insert_c = _prefill_and_insert.lower(params, config, tokens, lengths, sampling, context, int8_kv).compile()
    # Interleaved: ttft contains the prefill, so both must be timed under the same conditions to compare.
    prefill_s, ttft_s = _timed_together(
        [lambda: prefill_c(params, tokens, lengths), lambda: insert_c(params, tokens, lengths, sampling)], repeats
    )
    peak = _compiled_peak(insert_c)
    decode_s = None
    if gen_len > 0:
        first, cache = insert_c(params, tokens, lengths, sampling)
        decode_c = _decode_loop.lower(params, config, first, cache, sampling, gen_len).compile()
        del first, cache  # only their shapes were needed: kept, every timed run would hold two caches
        peak = max(peak, _compiled_peak(decode_c))

        def run_decode() -> float:
            first, cache = insert_c(params, tokens, lengths, sampling)
            jax.block_until_ready(cache)
            start = time.perf_counter()
            jax.block_until_ready(decode_c(params, first, cache, sampling))
            return time.perf_counter() - start

        run_decode()  # warm-up
        decode_s = statistics.median(run_decode() for _ in range(repeats))
    step_s = decode_s / gen_len if decode_s else None
    kv_dtype = jnp.int8 if int8_kv else transformer.compute_dtype(params)
    kv_per_token = 2 * config.n_layers * config.n_kv_heads * config.d_head * bytes_per_element(kv_dtype, config.d_head)
    # Decode step i (1..G) writes the token at position P + i - 1 and reads P + i keys: a mean of P + (G + 1) / 2.
    mean_context = prompt_len + (gen_len + 1) / 2
    step_bytes = params_nbytes(params) + int(batch * mean_context * kv_per_token)
    hbm = step_bytes / step_s if step_s else None
    # The model's own parameters, as analyze's MFU counts them (zero-padded heads and replicated kv heads left out).
    mfu = 2 * model_sizes(config).real_params * batch * prompt_len / (prefill_s * peak_flops) if peak_flops else None
    return BenchRow(
        model=config.name,
        weights=weights,
        kv_cache_dtype=kv_cache_dtype,
        batch=batch,
        prompt_len=prompt_len,
        gen_len=gen_len,
        layers=layers,
        int8_matmul=int8_matmul_label(layers == "unrolled"),
        # gen_len 0: no decode step ran, so none ran the kernel
        decode_attention=decode_attention_label(config, layers == "unrolled", kv_dtype, context) if gen_len else "xla",
        decode_norm=decode_norm_label(config, batch) if gen_len else "xla",
        device=jax.devices()[0].device_kind,
        platform=jax.devices()[0].platform,
        prefill_ms=prefill_s * 1e3,
        ttft_ms=ttft_s * 1e3,
        decode_step_ms=step_s * 1e3 if step_s else None,
        tokens_per_s=batch / step_s if step_s else None,
        hbm_bytes_per_step=step_bytes,
        hbm_gbps=hbm / 1e9 if hbm else None,
        copy_gbps=copy_bw / 1e9,
        read_gbps=read_bw / 1e9 if read_bw else None,
        hbm_fraction=hbm / copy_bw if hbm else None,
        prefill_mfu=mfu,
        peak_memory_bytes=peak or None,
    )


def run_bench(
    config: ModelConfig,
    batches: Sequence[int],
    weights_list: Sequence[str],
    prompt_len: int,
    gen_len: int,
    layers: str = "unrolled",
    repeats: int = 3,
    progress: bool = True,
    on_row: Callable[[BenchRow], None] | None = None,
    kv_cache_dtypes: Sequence[str] = ("auto",),
) -> list[BenchRow]:
    """All (weights, KV cache dtype, batch) rows for one model, weights made once per dtype; on_row(row) is called as
    each is done (so a caller can save rows before a long run ends or is cut off)."""
    for b in batches:
        if b < 1:
            raise UserError(f"--batch values must be >= 1, got {b}")
    if prompt_len < 1 or gen_len < 0:
        raise UserError(f"--prompt-len must be >= 1 and --gen-len >= 0, got {prompt_len} and {gen_len}")
    if layers not in ("scan", "unrolled"):
        raise UserError(f"--layers must be scan or unrolled, got {layers!r}")
    from meshserve.progress import progress as progress_bar  # `progress` is this function's on/off keyword

    copy_bw = measure_copy_bandwidth()
    read_bw = measure_read_bandwidth()
    _, peak = device_peak_flops()
    rows = []
    for kv in kv_cache_dtypes:
        check_kv_cache_dtype(kv)
    total = len(batches) * len(weights_list) * len(kv_cache_dtypes)
    with progress_bar(f"bench {config.name}", "row", total, disable=not progress) as bar:
        for weights in weights_list:
            params = bench_params(config, weights, layers, consume=True)  # held once: the peak memory column
            for kv in kv_cache_dtypes:
                for batch in batches:
                    rows.append(bench_row(params, config, weights, batch, prompt_len, gen_len, copy_bw, peak, layers,
                                          repeats, read_bw=read_bw, kv_cache_dtype=kv))  # fmt: skip
                    if on_row is not None:
                        on_row(rows[-1])
                    step_ms = f"{rows[-1].decode_step_ms or 0:.2f}"
                    bar.set_postfix(weights=weights, kv=kv, batch=batch, step_ms=step_ms)
                    bar.update()
            del params
            gc.collect()
    return rows


def peer_row(config: ModelConfig, batch: int, prompt_len: int, gen_len: int, repeats: int = 2) -> dict[str, float]:
    """transformers' FalconForCausalLM.generate (eager, KV cache, greedy) on the same shapes, bf16, random weights."""
    import torch
    from transformers import FalconConfig, FalconForCausalLM

    if config.mlp != "gelu" or not config.parallel_block or config.n_kv_heads != 1:
        raise UserError(f"--peer needs a Falcon-shaped model (gelu, parallel, multi-query), not {config.name}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = FalconConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        multi_query=True,
        parallel_attn=True,
        bias=config.linear_bias,
        new_decoder_architecture=False,
        alibi=False,
        layer_norm_epsilon=config.norm_eps,
        rope_theta=config.rope_base,
        max_position_embeddings=config.max_seq_len,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    prefill_s, one_s, total_s = _peer_times(FalconForCausalLM, hf_config, batch, prompt_len, gen_len, device, repeats)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    # Decode step = (generate(G) - generate(1)) / (G - 1): prefill and generate's set-up cancel out.
    step_s = max(total_s - one_s, 1e-9) / max(gen_len - 1, 1)
    return {
        "peer_prefill_ms": prefill_s * 1e3,
        "peer_decode_step_ms": step_s * 1e3,
        "peer_tokens_per_s": batch / step_s,
    }


def _peer_times(
    model_cls, hf_config, batch: int, prompt_len: int, gen_len: int, device: str, repeats: int
) -> tuple[float, float]:
    """(forward-pass seconds, generate(1 token) seconds, generate(G) seconds), medians; the model is freed on return."""
    import torch

    with torch.device(device):
        model = model_cls(hf_config).to(torch.bfloat16).eval()
    ids = torch.randint(0, hf_config.vocab_size, (batch, prompt_len), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    with torch.inference_mode():
        prefill_s = timed(lambda: model(ids))
        mask = torch.ones_like(ids)

        def gen(n: int):
            return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)

        one_s = timed(lambda: gen(1))
        total_s = timed(lambda: gen(gen_len))
    return prefill_s, one_s, total_s
