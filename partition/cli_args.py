"""Command-line flags that put a command on a device mesh: --mesh, --prefill-layout, --decode-layout, --attention.

Pure argparse (no JAX), so `--help` stays fast; `mesh_args(args)` turns the flags into layouts, and the
command builds the mesh with `partition.mesh.make_mesh(spec.mesh)` once JAX is loaded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from meshserve.partition.comm import ATTENTION_LAYOUTS, FFN_LAYOUTS, LayoutError, MeshShape
from meshserve.partition.rules import Layout

__all__ = ["add_mesh_arguments", "mesh_args", "MeshArgs"]


@dataclass(frozen=True)
class MeshArgs:
    mesh: MeshShape | None  # None: every device, in the paper's shape for that count
    prefill: Layout
    decode: Layout


def _mesh(text: str) -> MeshShape:
    try:
        return MeshShape.parse(text)
    except LayoutError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_mesh_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mesh and layout flags (all optional: without them a command runs on one device)."""
    group = parser.add_argument_group("mesh and layouts (PAPER.md; without these flags: one device)")
    group.add_argument(
        "--mesh",
        type=_mesh,
        metavar="XxYxZ",
        help="device mesh, e.g. 2x2x2 (x*y*z = device count; on CPU set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N)",
    )
    group.add_argument(
        "--prefill-layout",
        choices=FFN_LAYOUTS,
        help="feed-forward layout of prefill (default ws2d when a mesh is given)",
    )
    group.add_argument("--decode-layout", choices=FFN_LAYOUTS, help="feed-forward layout of decode (default ws2d)")
    group.add_argument(
        "--attention",
        choices=ATTENTION_LAYOUTS,
        help="attention sharded over heads or batch, both phases (default: heads for prefill, "
        "batch for decode, as the paper; weight-gathered layouts take batch only)",
    )
    group.add_argument("--collective-matmul", action="store_true",
                       help="ws2d decode: overlap its collectives with the matmuls (looped collective einsum)")  # fmt: skip


def mesh_args(args: argparse.Namespace) -> MeshArgs | None:
    """The layouts the flags ask for, or None when no mesh flag was given (run on one device)."""
    names = ("mesh", "prefill_layout", "decode_layout", "attention", "collective_matmul")
    if not any(getattr(args, name, None) for name in names):
        return None
    prefill_ffn = args.prefill_layout or "ws2d"
    # weight-gathered layouts split attention's batch (attention 'heads' is refused for them)
    prefill = Layout(prefill_ffn, args.attention or ("batch" if prefill_ffn.startswith("wg") else "heads"))
    decode_ffn = args.decode_layout or "ws2d"
    if args.collective_matmul and decode_ffn != "ws2d":
        raise LayoutError(f"--collective-matmul needs --decode-layout ws2d, got {decode_ffn}")
    decode = Layout(decode_ffn, args.attention or "batch", overlap=bool(args.collective_matmul))
    return MeshArgs(args.mesh, prefill, decode)
