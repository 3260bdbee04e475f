"""int8 weights as a type: `QuantizedArray` (int8 values + per-output-channel scales) and `einsum`.

Per-output-channel symmetric quantisation (PAPER.md "Other measures"): for a weight whose contracted
(input) axes are `contract_axes`, scale = max|w| over those axes / 127, values = round(w / scale).
The scale keeps the weight's rank, with size 1 on the contracted axes, so it shards with the same
logical axes as the values. Activations stay in the compute dtype; the scale is applied to the
matmul's output, so the int8 values are what moves through memory and collectives.

MESHSERVE_INT8_MATMUL picks how an int8-weight matmul runs: "xla" (XLA converts the weights to the compute
dtype, then a float GEMM; the default), "pallas" (model/int8_kernel.py, GPUs, decode-sized
batches), or "w8a8": each row of the activations (one token) is quantised too, to int8 with its own absmax scale,
and the matmul runs int8 x int8 -> int32 (integer tensor cores on a GPU: the weights are read as int8 with no
conversion pass), both scales applied to the output (as SmoothQuant's W8A8, without its smoothing). It changes
the numerics (the activations lose precision, ~0.4% of a row's largest value per element), so it is opt-in; on
XLA's CPU backend it is a plain integer dot. With unrolled layers on one device its weights are stored
contracted-axes-last (`int8_rows_layout`), as the GEMM wants them.
"rowsum" (model/int8_rows.py) stores each int8 weight with its contracted axes last when the layers are unrolled on
one device, so a matmul of at most 4 rows is a row reduction that reads each int8 byte once; other row counts, and
stacked layers or a mesh (where the weights keep their declared layout), run XLA's path. It was CUDA's default for a
day on a per-matmul probe; in the whole falcon-7b decode loop on an H200 (2026-11-28, BENCHMARKS.md) it tied XLA's
path at batch 1 (4.374 against 4.378 ms per step) and lost at batch 64 (5.742 against 5.457); profiled, its row
reductions took 124 us per layer against XLA's gemm fusions' 90 (XLA's path then lost 26 us to a padded copy of
wo). So "xla" is the default everywhere again.

Under "pallas" with a tuning file (MESHSERVE_INT8_TUNING) each shape takes what was fastest there on the device: a
kernel config, XLA's convert + GEMM, or, for at most 4 rows, "colsum": the matmul written as a float32 multiply and
a sum over K (int8_kernel.colsum_matmul), which XLA fuses into one column reduction that reads each int8 weight once.
Its twin on transposed weights (a row reduction) streamed 1.25-1.5x faster than a bf16 GEMM at batch 1 on an H200
(one run), where XLA's convert + GEMM and the Pallas kernel were slower than bf16 (int8_kernel.py's docstring).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

__all__ = [
    "QuantizedArray",
    "quantize",
    "dequantize",
    "einsum",
    "INT8_MATMULS",
    "int8_matmul_mode",
    "int8_matmul_label",
    "w8a8_einsum",
    "w8a8_values_einsum",
    "int8_rows_layout",
]

INT8_MATMULS = ("xla", "pallas", "w8a8", "rowsum")


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class QuantizedArray:
    """values: int8 [...] ; scale: bf16, same rank, 1 on the contracted axes.

    perm: None for the declared layout, or the order in which the declared axes are stored (values is the declared
    weight `.transpose(perm)`, contracted axes last: model/int8_rows.py); the scale always keeps the declared layout.
    """

    values: jax.Array
    scale: jax.Array
    perm: tuple[int, ...] | None = field(default=None, metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, ...]:
        """The declared (logical) shape, whatever the storage order."""
        if self.perm is None:
            return tuple(self.values.shape)
        stored = self.values.shape
        return tuple(stored[self.perm.index(axis)] for axis in range(len(stored)))

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        return int(self.values.size * self.values.dtype.itemsize + self.scale.size * self.scale.dtype.itemsize)


def quantize(w: jax.Array, contract_axes: Sequence[int], scale_dtype=jnp.bfloat16) -> QuantizedArray:
    """Symmetric int8 with one scale per output channel (max over `contract_axes`)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=tuple(contract_axes), keepdims=True)
    # The scale is stored in bf16; quantise against the rounded scale so values * scale round-trips.
    scale = (jnp.maximum(amax, 1e-12) / 127.0).astype(scale_dtype)
    values = jnp.clip(jnp.round(w32 / scale.astype(jnp.float32)), -127, 127).astype(jnp.int8)
    return QuantizedArray(values=values, scale=scale)


def dequantize(w: QuantizedArray, dtype=jnp.float32) -> jax.Array:
    """The weight in its declared layout, values * scale, in dtype."""
    values = w.values if w.perm is None else jnp.transpose(w.values, [w.perm.index(a) for a in range(len(w.perm))])
    return (values.astype(jnp.float32) * w.scale.astype(jnp.float32)).astype(dtype)


def _scale_for_output(subscripts: str, scale: jax.Array) -> jax.Array:
    """Reshape a keepdims scale of operand 2 so it broadcasts against the einsum's output."""
    inputs, out = subscripts.replace(" ", "").split("->")
    w_letters = inputs.split(",")[1]
    keep = [i for i, letter in enumerate(w_letters) if letter in out]
    squeezed = jnp.squeeze(scale, axis=tuple(i for i in range(scale.ndim) if i not in keep))
    kept_letters = "".join(w_letters[i] for i in keep)
    # Transpose the kept axes into output order, then add size-1 axes for the output's other letters.
    order = sorted(range(len(kept_letters)), key=lambda i: out.index(kept_letters[i]))
    squeezed = jnp.transpose(squeezed, order)
    shape = [squeezed.shape[sorted(kept_letters, key=out.index).index(c)] if c in kept_letters else 1 for c in out]
    return squeezed.reshape(shape)


def _split(subscripts: str) -> tuple[str, str, str, str]:
    """(x letters, w letters, out letters, contracted letters) of a two-operand einsum."""
    inputs, out = subscripts.replace(" ", "").split("->")
    x_letters, w_letters = inputs.split(",")
    return x_letters, w_letters, out, "".join(c for c in w_letters if c in x_letters and c not in out)


def int8_matmul_mode() -> str:
    """MESHSERVE_INT8_MATMUL (default "xla"); a value outside INT8_MATMULS is a UserError naming the variable."""
    mode = os.environ.get("MESHSERVE_INT8_MATMUL") or "xla"  # set but empty: unset, as a shell user means it
    if mode not in INT8_MATMULS:
        from meshserve.errors import UserError

        raise UserError(f"MESHSERVE_INT8_MATMUL must be one of {', '.join(INT8_MATMULS)}, got {mode!r}")
    return mode


def int8_rows_layout() -> bool:
    """Whether unrolled layers store their int8 weights contracted-axes-last (`params.unstack_layers(int8_rows=...)`,
    model/int8_rows.py): under "rowsum" (a row reduction at a few rows) and "w8a8", whose int8 x int8 GEMM takes
    both operands with K minor: on the declared [K, N] layout XLA transposed every int8 weight into a copy in each
    compiled call (deviceless H100 compile of falcon-7b; a serving step is one call, so once per token)."""
    return int8_matmul_mode() in ("rowsum", "w8a8")


def on_cuda() -> bool:
    """Whether this process's first device is a CUDA GPU: where `lax.platform_dependent(cuda=...)` picks the Pallas
    kernels (ROCm, also platform "gpu", takes the default branch)."""
    device = jax.devices()[0]
    return device.platform == "gpu" and "rocm" not in str(getattr(device.client, "platform_version", "")).lower()


def lowered_for_cuda(cuda: bool | None) -> bool:
    """Whether steps are lowered for CUDA: `cuda` as given (a deviceless compile for a GPU says True), else
    `on_cuda()` for this process's first device."""
    return on_cuda() if cuda is None else cuda


def int8_matmul_label(unrolled_layers: bool, cuda: bool | None = None) -> str:
    """How this process's int8 weight matmuls run, as bench rows and serve's start line name it: the mode, "xla"
    where the mode cannot apply (Pallas off CUDA; rowsum over stacked layers, which keep the declared layout), and
    "pallas-tuned" with a tuning file. cuda: whether the steps are lowered for CUDA (None: `on_cuda()`)."""
    mode = int8_matmul_mode()
    if (mode == "pallas" and not lowered_for_cuda(cuda)) or (mode == "rowsum" and not unrolled_layers):
        return "xla"
    return mode + "-tuned" if mode == "pallas" and os.environ.get("MESHSERVE_INT8_TUNING") else mode


def _plain_form(subscripts: str) -> bool:
    """Whether the einsum is [free_x, c] x [c, free_w] -> [free_x, free_w] (every weight matmul of the model)."""
    x_letters, w_letters, out, c = _split(subscripts)
    free_x, free_w = x_letters[: len(x_letters) - len(c)], w_letters[len(c) :]
    return bool(c) and x_letters.endswith(c) and w_letters.startswith(c) and out == free_x + free_w


def w8a8_einsum(subscripts: str, x: jax.Array, w: QuantizedArray) -> jax.Array:
    """x [free_x, c] quantised per row (absmax over the contracted axes c / 127) to int8, an int8 x int8 -> int32
    einsum with the int8 weights [c, free_w], then row scale [free_x, 1...] x channel scale applied: float32 out."""
    return w8a8_values_einsum(subscripts, x, w.values, _scale_for_output(subscripts, w.scale))


def w8a8_values_einsum(subscripts: str, x: jax.Array, values: jax.Array, out_scale: jax.Array) -> jax.Array:
    """`w8a8_einsum` over int8 values in any stored order (subscripts name their letters as stored: x's contracted
    letters last, the output's free_x first); out_scale: the channel scale, broadcastable to the output."""
    n_c = len(_split(subscripts)[3])
    xf = x.astype(jnp.float32)
    row_scale = jnp.maximum(jnp.max(jnp.abs(xf), axis=tuple(range(x.ndim - n_c, x.ndim))), 1e-30) / 127  # [free_x]
    xq = jnp.round(xf / row_scale.reshape(*row_scale.shape, *[1] * n_c)).astype(jnp.int8)  # |x| / scale <= 127
    y = jnp.einsum(subscripts, xq, values, preferred_element_type=jnp.int32).astype(jnp.float32)
    n_free_w = values.ndim - n_c
    return y * row_scale.reshape(*row_scale.shape, *[1] * n_free_w) * out_scale


def _int8_kernel_config(subscripts: str, x: jax.Array, w: QuantizedArray):
    """The Pallas kernel config or COLSUM (model/int8_kernel.py's Int8Choice) for this einsum, or None for XLA's
    path. Either runs when asked for, on CUDA (`einsum` picks it when lowering), for decode-sized batches (colsum:
    at most COLSUM_MAX_ROWS rows) and einsums of the form [free_x, c] x [c, free_w] -> [free_x, free_w] (every
    weight matmul of the model), unless a tuning file says XLA is faster for the shape."""
    if int8_matmul_mode() != "pallas":
        return None
    from meshserve.model.int8_kernel import COLSUM_MAX_ROWS, MAX_TOKENS, ColsumForm, choose_config

    n_c = len(_split(subscripts)[3])
    rows = math.prod(x.shape[: x.ndim - n_c])
    if not (_plain_form(subscripts) and rows <= MAX_TOKENS and jnp.dtype(x.dtype).itemsize == 2):
        return None
    choice = choose_config(rows, math.prod(x.shape[x.ndim - n_c :]), math.prod(w.shape[n_c:]))
    # load_tuning refuses colsum for a bucket above COLSUM_MAX_ROWS; this keeps the bound where the rows are known
    return None if isinstance(choice, ColsumForm) and rows > COLSUM_MAX_ROWS else choice


def _kernel_einsum(subscripts: str, x: jax.Array, w: QuantizedArray, config, out_dtype) -> jax.Array:
    """A plain-form einsum as x [M, K] @ w [K, N] through the Pallas kernel (config) or colsum (COLSUM)."""
    from meshserve.model.int8_kernel import ColsumForm, colsum_matmul, int8_matmul

    x_letters, w_letters, _, c = _split(subscripts)
    n_free_x = len(x_letters) - len(c)
    free_x_shape, free_w_shape = x.shape[:n_free_x], w.values.shape[len(c) :]
    k = math.prod(x.shape[n_free_x:])
    x2, w2, scale = x.reshape(-1, k), w.values.reshape(k, -1), w.scale.reshape(-1)
    if isinstance(config, ColsumForm):
        y = colsum_matmul(x2, w2, scale, out_dtype=out_dtype)  # float32 sum rounded once, to out_dtype
    else:
        y = int8_matmul(x2, w2, scale, config=config).astype(out_dtype)
    return y.reshape(*free_x_shape, *free_w_shape)


def einsum(subscripts: str, x: jax.Array, w: jax.Array | QuantizedArray, *, out_dtype=None) -> jax.Array:
    """The one matmul of the model: `jnp.einsum(subscripts, x, w)` for plain or int8 weights.

    Weights are cast to x's dtype (the compute dtype); int8 scales are applied to the output, which
    is exact because each scale is constant along the contracted axes.
    """
    out_dtype = out_dtype or x.dtype
    if isinstance(w, QuantizedArray) and w.perm is not None:  # stored contracted-axes-last: model/int8_rows.py
        from meshserve.model.int8_rows import rows_einsum

        return rows_einsum(subscripts, x, w, out_dtype)
    config = _int8_kernel_config(subscripts, x, w) if isinstance(w, QuantizedArray) else None
    if config is not None:
        # Chosen when the step is lowered, not by the process's default backend: the kernel on CUDA, XLA's convert
        # + GEMM elsewhere, so a compile for a GPU on a host without one (decode_hlo.py --target) gets the kernel.
        return jax.lax.platform_dependent(
            x,
            w,
            cuda=lambda x, w: _kernel_einsum(subscripts, x, w, config, out_dtype),
            default=lambda x, w: _convert_einsum(subscripts, x, w, out_dtype),
        )
    if isinstance(w, QuantizedArray) and int8_matmul_mode() == "w8a8" and _plain_form(subscripts):
        return w8a8_einsum(subscripts, x, w).astype(out_dtype)
    if isinstance(w, QuantizedArray):
        return _convert_einsum(subscripts, x, w, out_dtype)
    return jnp.einsum(subscripts, x, w.astype(x.dtype), preferred_element_type=out_dtype)


def concat_einsum(x: jax.Array, weights: Sequence[jax.Array | QuantizedArray]) -> tuple[jax.Array, list] | None:
    """x [B, T, E] times weights [E, ...] side by side, as one GEMM over their concatenation along the output
    axis (the paper's fused input projection; XLA reads the concatenation inside its GEMM fusion rather than copying
    it, deviceless H100 compile): (y [B, T, N1 + N2 + ...] in x's dtype, each weight's channel scale [Ni] or None).

    16-bit weights are cast to x's dtype and their scales are None. int8 weights on XLA's path contribute their
    values and y is their product unscaled, rounded to x's dtype as `einsum` rounds it: the caller applies each
    scale (in float32, rounding again, as `einsum` does) where it reads y, in a kernel as it loads it or in XLA's
    fusion of the consumer, rather than in a kernel of its own per weight. None where the weights mix kinds or an
    int8 one would take another path (a Pallas config, w8a8, a transposed layout), whose rounding this would not
    reproduce."""
    quantized = [isinstance(w, QuantizedArray) for w in weights]
    if any(quantized) and not all(quantized):
        return None
    if all(quantized) and any(
        w.perm is not None or int8_matmul_mode() not in ("xla", "pallas") or _int8_kernel_config("BTE,EF->BTF", x, w)
        for w in weights
    ):
        return None
    E = x.shape[-1]
    values = [(w.values if q else w).reshape(E, -1).astype(x.dtype) for w, q in zip(weights, quantized, strict=True)]
    y = jnp.einsum("BTE,EF->BTF", x, jnp.concatenate(values, axis=1) if len(values) > 1 else values[0],
                   preferred_element_type=x.dtype)  # fmt: skip
    return y, [w.scale.reshape(-1) if q else None for w, q in zip(weights, quantized, strict=True)]


def scaled_output(y: jax.Array, scale: jax.Array | None) -> jax.Array:
    """y [..., N] (an int8 weight's product, unscaled) times its channel scale (broadcastable to y; None: as is): in
    float32, rounded to y's dtype. XLA's int8 path (`_convert_einsum`) and `concat_einsum`'s callers both use it."""
    return y if scale is None else (y.astype(jnp.float32) * scale.astype(jnp.float32)).astype(y.dtype)


def _convert_einsum(subscripts: str, x: jax.Array, w: QuantizedArray, out_dtype) -> jax.Array:
    """XLA's int8 path: the weights converted to x's dtype, the einsum (float32-accumulated) out in out_dtype as a
    16- or 32-bit weight's is, the scales after. A float32 output of bf16 operands made XLA:GPU upcast the operands,
    converting each int8 weight to a padded float32 copy on every decode step (deviceless H100 compile of falcon-7b
    at batch 1: wqkv and wo, 4 bytes written and read per weight byte); in the weights' own dtype the conversion
    stays inside the GEMM. The product is rounded to out_dtype once before the scale and once after."""
    y = jnp.einsum(subscripts, x, w.values.astype(x.dtype), preferred_element_type=out_dtype)
    return scaled_output(y, _scale_for_output(subscripts, w.scale))
