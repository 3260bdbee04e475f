"""Command-line flags that put a command on a device mesh: --mesh, --prefill-layout, --decode-layout, --attention.

Pure argparse (no JAX), so `--help` stays fast; `mesh_args(args)` turns the flags into layouts, and the
command builds the mesh with `partition.mesh.make_mesh(spec.mesh)` once JAX is loaded. The layout flags need
--mesh with more than one device: without it they would silently change nothing, so they are refused.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from meshserve.partition.comm import ATTENTION_LAYOUTS, FFN_LAYOUTS, LayoutError, MeshShape
from meshserve.partition.rules import Layout

__all__ = ["add_mesh_arguments", "mesh_args", "MeshArgs"]


@dataclass(frozen=True)
class MeshArgs:
    mesh: MeshShape | None  # mesh_args always sets it; None (make_mesh: every device) is for library callers
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
        "XLA_FLAGS=--xla_force_host_platform_device_count=N); default: none, one device",
    )
    group.add_argument(
        "--prefill-layout",
        choices=FFN_LAYOUTS,
        help="with --mesh: feed-forward layout of prefill (default ws2d)",
    )
    group.add_argument(
        "--decode-layout",
        choices=FFN_LAYOUTS,
        help="with --mesh: feed-forward layout of decode (default ws2d)",
    )
    group.add_argument(
        "--attention",
        choices=ATTENTION_LAYOUTS,
        help="with --mesh: attention sharded over heads or batch, both phases (default: heads for prefill, "
        "batch for decode, as the paper; weight-gathered layouts take batch only)",
    )
    group.add_argument("--collective-matmul", action="store_true",
                       help="with --mesh and ws2d decode: overlap its collectives with the matmuls (looped "
                            "collective einsum; default: off)")  # fmt: skip


_LAYOUT_FLAGS = {
    "prefill_layout": "--prefill-layout",
    "decode_layout": "--decode-layout",
    "attention": "--attention",
    "collective_matmul": "--collective-matmul",
}


def _them(flags: list[str]) -> str:
    return "them" if len(flags) > 1 else "it"


def mesh_args(args: argparse.Namespace) -> MeshArgs | None:
    """The layouts the flags ask for, or None when --mesh was not given (run on one device).

    Raises LayoutError (a UserError) for layout flags without --mesh or on a one-device mesh, where they would
    change nothing, and for a ws1d phase whose other phase was left to its default ws2d (stored differently).
    """
    given = [flag for name, flag in _LAYOUT_FLAGS.items() if getattr(args, name, None)]
    mesh = getattr(args, "mesh", None)
    if mesh is None:
        if given:
            raise LayoutError(
                f"{' and '.join(given)} {'need' if len(given) > 1 else 'needs'} --mesh XxYxZ: without a mesh the "
                f"model runs on one device, where there is nothing to split (add --mesh, or drop {_them(given)})"
            )
        return None
    if mesh.n == 1 and given:
        raise LayoutError(
            f"{' and '.join(given)} {'mean' if len(given) > 1 else 'means'} nothing on the one-device mesh {mesh}: "
            f"drop {_them(given)}, or give a mesh of several devices"
        )
    prefill_ffn = args.prefill_layout or "ws2d"
    decode_ffn = args.decode_layout or "ws2d"
    # Weights never move between phases, so ws1d (E·F_xyz) cannot pair with ws2d (E_x·F_yz): when the ws2d side is
    # a default, name the flag the user left out rather than a layout they never typed.
    one_defaulted = args.prefill_layout is None or args.decode_layout is None
    if one_defaulted and prefill_ffn != decode_ffn and "ws1d" in (prefill_ffn, decode_ffn):
        flag, other, phase = (
            ("--prefill-layout", "--decode-layout", "decode")
            if args.prefill_layout
            else ("--decode-layout", "--prefill-layout", "prefill")
        )
        raise LayoutError(
            f"{flag} ws1d and the default {phase} layout ws2d store weights differently (ws1d: E·F_xyz; "
            f"ws2d: E_x·F_yz): add {other} ws1d"
        )
    # weight-gathered layouts split attention's batch (attention 'heads' is refused for them)
    prefill = Layout(prefill_ffn, args.attention or ("batch" if prefill_ffn.startswith("wg") else "heads"))
    if args.collective_matmul and decode_ffn != "ws2d":
        raise LayoutError(f"--collective-matmul needs --decode-layout ws2d, got {decode_ffn}")
    decode = Layout(decode_ffn, args.attention or "batch", overlap=bool(args.collective_matmul))
    return MeshArgs(mesh, prefill, decode)
