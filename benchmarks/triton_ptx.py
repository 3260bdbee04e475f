"""Compile a function's Pallas Triton kernels to PTX for a GPU, on a host without one.

A deviceless compile (decode_hlo.py --target) runs XLA:GPU's pipeline, but with jaxlib <= 0.10.2 a Pallas kernel
travels as Triton IR inside its custom call and is compiled to PTX only when the executable is loaded on a device:
a kernel Triton cannot compile would pass the deviceless compile and fail on the GPU. Newer jaxlibs compile it
when the function is lowered, through the CUDA plugin's Triton compiler, which needs no device; `ptx_of` takes that
path on any jaxlib (the CUDA plugin must be installed: see decode_hlo.py --target) and returns what it compiled.

    python benchmarks/triton_ptx.py --target h100      # the decode attention and norm kernels at falcon-7b's and
                                                       # llama's shapes
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))


def ptx_of(fn: Callable, *args: Any) -> list[dict[str, Any]]:
    """Lower jax.jit(fn)(*args) (abstract args placed on a deviceless GPU, e.g. by decode_hlo.target_sharding),
    compiling each Pallas Triton kernel to PTX on the way: one {"arch", "smem_bytes", "ptx_chars"} per kernel.
    A kernel Triton rejects raises here."""
    import jax
    import jax._src.pallas.triton.pallas_call_registration as registration
    from jax._src.lib import triton

    compiled: list[dict[str, Any]] = []

    def compile_and_note(platform, module, arch_name, **kwargs):
        result = triton.compile(platform, module, arch_name, **kwargs)
        compiled.append({"arch": arch_name, "smem_bytes": result.smem_bytes, "ptx_chars": len(result.asm)})
        return result

    module, version = registration.triton, registration.jaxlib_version
    # The lowering compiles Triton itself only past jaxlib 0.10.2; it calls triton.compile through this module.
    registration.triton = _Proxy(module, compile_and_note)
    registration.jaxlib_version = max(version, (0, 10, 3))
    try:
        jax.jit(fn).lower(*args)
    finally:
        registration.triton, registration.jaxlib_version = module, version
    return compiled


class _Proxy:
    """The jax._src.lib.triton module with `compile` replaced."""

    def __init__(self, module: Any, compile_fn: Callable) -> None:
        self._module, self.compile = module, compile_fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def main(argv: list[str] | None = None) -> int:
    from decode_hlo import GPU_TARGETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="h100", choices=sorted(t.stem for t in GPU_TARGETS.glob("*.txtpb")),
                   help="the GPU to compile for: a benchmarks/gpu_targets/*.txtpb name (default h100)")  # fmt: skip
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["JAX_SKIP_CUDA_CONSTRAINTS_CHECK"] = "1"
    import jax
    import jax.numpy as jnp
    from decode_hlo import target_sharding
    from meshserve.errors import UserError
    from meshserve.model.decode_attention import decode_attention, decode_attention_rotating
    from meshserve.model.decode_norm import decode_add_norm, decode_norm

    try:
        sharding = target_sharding(args.target)
    except UserError as e:  # no CUDA plugin here
        print(f"triton_ptx: error: {e}", file=sys.stderr)
        return 2

    def spec(shape, dtype=jnp.bfloat16):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    # (name, B, H, K, Q, S, context, out_heads, head_block): falcon-7b's MQA at the bench's 128 + 128 and batch 64,
    # with the zero heads an int8 wo_padded meets (72), and 16 heads to a program; a llama-style GQA at a long context
    # (several splits).
    cases = [("falcon-7b b1", 1, 71, 1, 64, 256, 256, None, None),
             ("falcon-7b b64", 64, 71, 1, 64, 256, 256, None, None),
             ("falcon-7b b1, 72 heads out", 1, 71, 1, 64, 256, 256, 72, None),
             ("falcon-7b b1, 16-head blocks", 1, 71, 1, 64, 256, 256, 72, 16),
             ("llama GQA 4k b1", 1, 32, 8, 128, 4096, 4096, None, None)]  # fmt: skip
    for name, B, H, K, Q, S, context, out_heads, head_block in cases:
        kernels = ptx_of(
            lambda q, kc, vc, pos, kn, vn, c=context, o=out_heads, hb=head_block: decode_attention(
                q, kc, vc, 0, pos, kn, vn, c, interpret=False, out_heads=o, head_block=hb),
            spec((B, 1, H, Q)), spec((2, B, S, K, Q)), spec((2, B, S, K, Q)), spec((B,), jnp.int32),
            spec((B, 1, K, Q)), spec((B, 1, K, Q)),
        )  # fmt: skip
        for k in kernels:
            print(f"{name}: sm_{k['arch'].replace('.', '')} PTX {k['ptx_chars']} chars, {k['smem_bytes']} B shared")
    # The kernel rotating q and the own k itself (decode_attention_rotating), over falcon-7b's merged projection
    # (q, k, v, then the up projection's 284 heads of 64) at batch 1 and 64, palm-8b's (16 heads of 256, then gate
    # and up: 128 heads), and llama's GQA at 4k (several splits).
    # "int8": the projection unscaled, wqkv's channel scale [H + 2K, Q] applied in the kernel (projection_scale).
    rotating_cases = [("rotating falcon-7b b1", 1, 71, 1, 64, 357, 256, 72),
                      ("rotating falcon-7b b64", 64, 71, 1, 64, 357, 256, 72),
                      ("rotating falcon-7b int8 b1", 1, 71, 1, 64, 357, 256, 72),
                      ("rotating falcon-7b int8 b64", 64, 71, 1, 64, 357, 256, 72),
                      ("rotating palm-8b b1", 1, 16, 1, 256, 146, 256, None),
                      ("rotating llama GQA 4k int8 b1", 1, 32, 8, 128, 48, 4096, None),
                      ("rotating llama GQA 4k b1", 1, 32, 8, 128, 48, 4096, None),
                      ("rotating qwen3-8b qk-norm b1", 1, 32, 8, 128, 48, 256, None),
                      ("rotating gemma3-1b qk-norm b1", 1, 4, 1, 256, 6, 256, None)]  # fmt: skip
    for name, B, H, K, Q, Hs, S, out_heads in rotating_cases:
        scales = [spec((H + 2 * K, Q))] if "int8" in name else []
        norms = [spec((Q,)), spec((Q,))] if "qk-norm" in name else []  # q_norm's and k_norm's scales
        n = len(scales)
        kernels = ptx_of(
            lambda proj, kc, vc, pos, cos, sin, *extra, H=H, S=S, o=out_heads, n=n: decode_attention_rotating(
                proj, H, kc, vc, 0, pos, cos, sin, S, interpret=False, out_heads=o,
                projection_scale=extra[0] if n else None,
                head_norm=(extra[n], extra[n + 1], 1e-6, True) if len(extra) > n else None),
            spec((B, 1, Hs, Q)), spec((2, B, S, K, Q)), spec((2, B, S, K, Q)), spec((B,), jnp.int32),
            spec((B, Q // 2), jnp.float32), spec((B, Q // 2), jnp.float32), *scales, *norms,
        )  # fmt: skip
        for k in kernels:
            print(f"{name}: sm_{k['arch'].replace('.', '')} PTX {k['ptx_chars']} chars, {k['smem_bytes']} B shared")
    # The decode norm (model/decode_norm.py) at falcon-7b's E = 4544 (a masked 8192-lane block; layernorm with bias),
    # palm-8b's 4096 (layernorm, no bias) and llama's 4096 (rmsnorm), batch 1 and 64.
    norm_cases = [(f"decode_norm {model} {kind} E {E} b{R}", R, E, kind, bias)
                  for model, E, kind, bias in (("falcon-7b", 4544, "layernorm", True),
                                               ("palm-8b", 4096, "layernorm", False),
                                               ("llama", 4096, "rmsnorm", False))
                  for R in (1, 64)]  # fmt: skip
    for name, R, E, kind, has_bias in norm_cases:
        kernels = ptx_of(
            lambda x, scale, *bias, kind=kind: decode_norm(x, scale, bias[0] if bias else None, kind=kind, eps=1e-5,
                                                           scale_offset=False, interpret=False),
            spec((R, 1, E)), spec((E,)), *([spec((E,))] if has_bias else []),
        )  # fmt: skip
        for k in kernels:
            print(f"{name}: sm_{k['arch'].replace('.', '')} PTX {k['ptx_chars']} chars, {k['smem_bytes']} B shared")
    # A post-norm block's seam in one kernel (decode_norm.decode_add_norm) at gemma3-1b's E = 1152 and gemma3-27b's
    # 5376, batch 1.
    for name, E in (("decode_add_norm gemma3-1b E 1152 b1", 1152), ("decode_add_norm gemma3-27b E 5376 b1", 5376)):
        kernels = ptx_of(
            lambda a, x, s1, s2: decode_add_norm(a, x, s1, s2, kind="rmsnorm", eps=1e-6, scale_offset=True,
                                                 interpret=False),
            spec((1, 1, E)), spec((1, 1, E)), spec((E,)), spec((E,)),
        )  # fmt: skip
        for k in kernels:
            print(f"{name}: sm_{k['arch'].replace('.', '')} PTX {k['ptx_chars']} chars, {k['smem_bytes']} B shared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
