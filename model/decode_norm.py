"""One-kernel LayerNorm / RMSNorm for decode rows on GPUs (Pallas, Triton backend).

XLA compiles `layers.norm` into two kernels per norm on a GPU: a row reduction for the statistics
(input_reduce_fusion, 1.58 us in a falcon-7b bf16 decode step on an H200,
benchmarks/results/h200-2026-11-28/profile_bf16_1_x.json) and an elementwise apply (loop_convert_fusion, 1.47 us),
each costing about a launch at decode's size. This kernel does both in one launch: one program per row loads the
row once, reduces, normalises, scales and stores. At decode the rows are B (1..256) of E (2048..8192) elements, so a
row fits in one program's registers (`default_warps`). Not timed on a GPU yet: the saving is a launch per norm.
That holds for LayerNorm, and for RMSNorm at batch 1; from batch 8 XLA makes an RMSNorm one Triton fusion, so
decode steps use the kernel only where it saves one (`norms_in_kernel`).

It computes what `layers.norm` computes, in float32 with the same formulas (the shifted one-pass variance for
layernorm), so the two agree to float32 rounding (the sums are added in another order). As in
model/decode_attention.py it runs compiled on CUDA and interpreted (its body as XLA ops) elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from meshserve.model import decode_attention
from meshserve.model.config import ModelConfig
from meshserve.model.decode_attention import run_kernel

__all__ = [
    "NORM_KINDS",
    "add_norms_in_kernel",
    "decode_add_norm",
    "decode_norm",
    "decode_norm_label",
    "default_warps",
    "kernel_add_norm",
    "kernel_norm",
    "norm_kernel_supported",
    "norms_in_kernel",
]

NORM_KINDS = ("layernorm", "rmsnorm")
# The widest row's block. A program of 32 warps (Triton's most: 1024 threads) may use at most 64 registers a thread
# (65536 per SM); ptxas for sm_90a fits a 32768-lane block's layernorm in those with 8 bytes spilled, and a 65536-lane
# block would spill most of its row. palm-540b's E = 18432 (a 32768-lane block) is the widest preset.
_MAX_LANES = 32768
_MAX_WARPS = 32
_LANES_PER_WARP = 1024  # 32 lanes a thread: see `default_warps`


def norm_kernel_supported(E: int) -> bool:
    """Whether the kernel takes rows of E elements: 1 <= E and next_power_of_2(E) <= 32768 (a wider row's block
    does not fit the registers of one program; see _MAX_LANES)."""
    return E >= 1 and _lanes(E) <= _MAX_LANES


def default_warps(E: int) -> int:
    """Warps per program for rows of E: one per 1024 lanes of the block (32 lanes a thread), at least 4 (Triton's
    default) and at most 32. ptxas (sm_90a, bf16 layernorm with bias) then gives 40 to 80 registers a thread and no
    spill from E = 2048 to 18432: 4096 -> 4 warps, 71 registers; falcon-7b's 4544 (an 8192-lane block) -> 8 warps,
    48 (80 at 4 warps); 8192 -> 8 warps, 80 (168 at 4). Fewer registers let more rows' programs share an SM at
    batch 64 to 256; at batch 1 more warps keep more of the lone row's loads in flight."""
    return min(_MAX_WARPS, max(4, _lanes(E) // _LANES_PER_WARP))


def _lanes(E: int) -> int:
    """Triton's block shapes are powers of two: next_power_of_2(E)."""
    return 1 << max(0, E - 1).bit_length()


def decode_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array | None,
    *,
    kind: str,
    eps: float,
    scale_offset: bool,
    interpret: bool | None = None,
    num_warps: int | None = None,
) -> jax.Array:
    """`layers.norm` in one kernel. x [..., E] (leading dims flattened to R rows, one program each); scale [E];
    bias [E] or None; kind "layernorm" | "rmsnorm"; eps: added to the variance (or mean square); scale_offset: the
    rows are multiplied by 1 + scale (Gemma). Returns [..., E] in x's dtype. interpret: run the kernel body as XLA
    ops (None: on every platform but CUDA, chosen when lowered, so a deviceless compile for a GPU gets the kernel).
    num_warps: Triton's (None: `default_warps(E)`)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind must be one of {', '.join(NORM_KINDS)}, got {kind!r}")
    E = x.shape[-1]
    if not norm_kernel_supported(E):
        raise ValueError(f"decode_norm takes rows of 1 to {_MAX_LANES} elements, got E = {E}")
    if x.size == 0:
        return x
    static = dict(kind=kind, eps=float(eps), offset=bool(scale_offset),
                  num_warps=default_warps(E) if num_warps is None else num_warps)  # fmt: skip
    args = (x.reshape(-1, E), scale) + (() if bias is None else (bias,))
    return run_kernel(_decode_norm, *args, interpret=interpret, **static).reshape(x.shape)


def _normalized(x32, x_first, mask, scale_ref, b_ref, *, E, kind, eps, offset):
    """`layers.norm` of one row in a kernel: x32 [lanes] float32 (lanes [E, lanes) loaded as 0), x_first its element
    0 (layernorm's shift; unused by rmsnorm) -> [lanes] float32, scaled (and biased) as layers.norm does, before its
    rounding to the output dtype."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    lanes = x32.shape[0]
    # Padding lanes are 0, and the sums are divided by the true E, so they add nothing to the statistics.
    if kind == "layernorm":
        # layers.norm's shifted one-pass variance: d = x - x_0 keeps a large common offset from cancelling in
        # E[d^2] - E[d]^2. A padding lane's d would be 0 - x_0: masked to 0, or it would enter both sums.
        d = jnp.where(mask, x32 - x_first, 0.0)
        shift_mean = jnp.sum(d) / E
        variance = jnp.maximum(jnp.sum(d * d) / E - shift_mean * shift_mean, 0.0)
        y = (d - shift_mean) * jax.lax.rsqrt(variance + eps)
    else:
        y = x32 * jax.lax.rsqrt(jnp.sum(x32 * x32) / E + eps)
    s = plgpu.load(scale_ref.at[pl.ds(0, lanes)], mask=mask, other=0.0).astype(jnp.float32)
    y = y * (1.0 + s if offset else s)  # layers.norm_scale
    if b_ref is not None:
        y = y + plgpu.load(b_ref.at[pl.ds(0, lanes)], mask=mask, other=0.0).astype(jnp.float32)
    return y


@functools.partial(jax.jit, static_argnames=("kind", "eps", "offset", "interpret", "num_warps"), inline=True)
def _decode_norm(x, scale, bias=None, *, kind, eps, offset, interpret, num_warps):
    """x [R, E], scale [E], bias [E] or None -> [R, E] in x's dtype; grid (R,), one row per program."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    R, E = x.shape
    lanes = _lanes(E)

    def kernel(x_ref, scale_ref, *refs):
        b_ref, o_ref = refs if bias is not None else (None, refs[0])
        mask = jnp.arange(lanes) < E
        x32 = plgpu.load(x_ref.at[pl.ds(0, lanes)], mask=mask, other=0.0).astype(jnp.float32)
        y = _normalized(x32, x_ref[0].astype(jnp.float32), mask, scale_ref, b_ref, E=E, kind=kind, eps=eps,
                        offset=offset)  # fmt: skip
        plgpu.store(o_ref.at[pl.ds(0, lanes)], y.astype(o_ref.dtype), mask=mask)

    row = pl.BlockSpec((None, E), lambda r: (r, 0))
    whole = pl.BlockSpec((E,), lambda r: (0,))  # scale and bias: the same [E] for every row
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((R, E), x.dtype),
        grid=(R,),
        in_specs=[row, whole] + ([] if bias is None else [whole]),
        out_specs=row,
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="decode_norm",
    )(x, scale, *(() if bias is None else (bias,)))


def decode_add_norm(
    a: jax.Array,
    x: jax.Array,
    post_scale: jax.Array,
    pre_scale: jax.Array,
    *,
    kind: str,
    eps: float,
    scale_offset: bool,
    interpret: bool | None = None,
    num_warps: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """A post-norm block's seam in one kernel: y = x + norm(a; post_scale), h = norm(y; pre_scale), each norm as
    `layers.norm` without bias and rounded to x's dtype where XLA's is (the normed a before the add, y, h).
    a, x [..., E] (R rows, one program each) -> (y, h) [..., E] in x's dtype. RMSNorm only (kind "rmsnorm").

    Why: in a Gemma 3 decode step at batch 1 XLA spends three kernels on each seam, between a sublayer's output and
    the next one's input (the post-norm's statistics, the next norm's statistics with the add, their use); here it
    is one (`transformer._post_norm_layer`, deviceless H100 compile of gemma3-1b bf16: 409 -> 307 kernels)."""
    if kind != "rmsnorm":  # the post-norm models (Gemma 2, 3) are RMSNorm ones
        raise ValueError(f"decode_add_norm takes kind 'rmsnorm' only, got {kind!r}")
    E = x.shape[-1]
    if a.shape != x.shape or not norm_kernel_supported(E):
        raise ValueError(f"decode_add_norm takes a and x of one shape [..., E <= {_MAX_LANES}], got {a.shape}, "
                         f"{x.shape}")  # fmt: skip
    if x.size == 0:
        return x, x
    static = dict(kind=kind, eps=float(eps), offset=bool(scale_offset),
                  num_warps=default_warps(E) if num_warps is None else num_warps)  # fmt: skip
    y, h = run_kernel(_decode_add_norm, a.reshape(-1, E), x.reshape(-1, E), post_scale, pre_scale,
                      interpret=interpret, **static)  # fmt: skip
    return y.reshape(x.shape), h.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("kind", "eps", "offset", "interpret", "num_warps"), inline=True)
def _decode_add_norm(a, x, post_scale, pre_scale, *, kind, eps, offset, interpret, num_warps):
    """a, x [R, E], scales [E] -> (y, h) [R, E] in x's dtype; grid (R,), one row per program."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    R, E = x.shape
    lanes = _lanes(E)
    norm = functools.partial(_normalized, b_ref=None, E=E, kind=kind, eps=eps, offset=offset)

    def kernel(a_ref, x_ref, post_ref, pre_ref, y_ref, h_ref):
        mask = jnp.arange(lanes) < E
        a32 = plgpu.load(a_ref.at[pl.ds(0, lanes)], mask=mask, other=0.0).astype(jnp.float32)
        a_normed = norm(a32, None, mask, post_ref).astype(x.dtype)  # layers.norm's rounding
        x32 = plgpu.load(x_ref.at[pl.ds(0, lanes)], mask=mask, other=0.0).astype(jnp.float32)
        y = (x32 + a_normed.astype(jnp.float32)).astype(x.dtype)  # the residual add in x's dtype, as XLA's
        plgpu.store(y_ref.at[pl.ds(0, lanes)], y, mask=mask)
        h = norm(jnp.where(mask, y.astype(jnp.float32), 0.0), None, mask, pre_ref)
        plgpu.store(h_ref.at[pl.ds(0, lanes)], h.astype(x.dtype), mask=mask)

    row = pl.BlockSpec((None, E), lambda r: (r, 0))
    whole = pl.BlockSpec((E,), lambda r: (0,))
    return pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((R, E), x.dtype)] * 2,
        grid=(R,),
        in_specs=[row, row, whole, whole],
        out_specs=[row, row],
        compiler_params=None if interpret else plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="decode_add_norm",
    )(a, x, post_scale, pre_scale)


def norms_in_kernel(config: ModelConfig, batch: int) -> bool:
    """Whether a decode step of `batch` rows runs its norms as model/decode_norm.py's kernel: under the decode
    attention's switch (`decode_attention_mode()` "pallas"), where XLA launches two kernels per norm (the
    statistics, then their use) and the kernel one. That is LayerNorm (falcon-7b, palm-8b), and RMSNorm at batch 1
    only: from batch 8 XLA makes each RMSNorm one Triton fusion, which in Gemma 3 also takes the residual add and
    the post-norm, so there the kernel adds launches (deviceless H100 compile, gemma3-1b bf16 batch 8: 316 -> 434
    kernels per step; llama-2-7b batch 64 402 either way). Post-norm blocks take `add_norms_in_kernel` instead."""
    if decode_attention.decode_attention_mode() != "pallas" or not norm_kernel_supported(config.d_model):
        return False
    return not config.post_norms and (config.norm == "layernorm" or batch == 1)


def add_norms_in_kernel(config: ModelConfig, batch: int) -> bool:
    """Whether a post-norm block's seams (x + norm(a sublayer's output), then the next norm) run as one kernel each
    (`decode_add_norm`, `transformer._post_norm_layer`) in a decode step of `batch` rows: under the same switch,
    RMSNorm, at batch 1, where XLA spent three kernels on each (gemma3-1b bf16, deviceless H100 compile); from
    batch 8 XLA makes a seam one Triton fusion itself (`norms_in_kernel`)."""
    return (
        config.post_norms
        and config.norm == "rmsnorm"
        and batch == 1
        and decode_attention.decode_attention_mode() == "pallas"
        and norm_kernel_supported(config.d_model)
    )


def kernel_add_norm(a: jax.Array, x: jax.Array, post: dict, pre: dict, config: ModelConfig):
    """A post-norm seam (x + norm(a; post), norm(that; pre)) as one kernel (`decode_add_norm`). RMSNorm
    (`add_norms_in_kernel`): its params are a scale only (`params.declare`)."""
    return decode_add_norm(a, x, post["scale"], pre["scale"], kind=config.norm, eps=config.norm_eps,
                           scale_offset=config.norm_scale_offset)  # fmt: skip


def decode_norm_label(config: ModelConfig, batch: int, cuda: bool | None = None) -> str:
    """How a decode step of `batch` rows runs its norms, as bench rows name it: "pallas" (model/decode_norm.py's
    kernel on CUDA), "pallas-interpret" (elsewhere) or "xla" (`norms_in_kernel`). cuda: whether the step is lowered
    for CUDA (None: this process's first device)."""
    from meshserve.model.quant import lowered_for_cuda

    if not (norms_in_kernel(config, batch) or add_norms_in_kernel(config, batch)):
        return "xla"
    return "pallas" if lowered_for_cuda(cuda) else "pallas-interpret"


def kernel_norm(x: jax.Array, p: dict[str, jax.Array], config: ModelConfig) -> jax.Array:
    """`layers.norm` as one kernel (model/decode_norm.py): a decode step's norms where XLA launched two kernels."""
    return decode_norm(x, p["scale"], p.get("bias"), kind=config.norm, eps=config.norm_eps,
                       scale_offset=config.norm_scale_offset)  # fmt: skip
