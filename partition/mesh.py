"""Device meshes with the paper's three axes x, y, z (one device is the 1x1x1 case of the same code).

On TPU the axes follow the torus; on CPU the emulated devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)
stand in for a slice. Every mesh is built with explicit `Auto` axis types: the layouts below place data with
NamedShardings and `jax.shard_map`, so no axis needs sharding-in-types.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh
from meshserve.partition.comm import MESH_AXES, LayoutError, MeshShape

__all__ = ["make_mesh", "mesh_shape", "default_shape", "PAPER_SHAPES"]

# Mesh shapes the paper's code used per chip count (PAPER.md, "Hardware the paper used").
PAPER_SHAPES = {4: (2, 1, 2), 8: (2, 2, 2), 16: (2, 4, 2), 32: (4, 2, 4), 64: (4, 4, 4), 128: (8, 4, 4), 256: (4, 8, 8)}


def default_shape(n: int) -> MeshShape:
    """The paper's shape for n chips, else the most cubic X·Y·Z = n with X <= Y <= Z."""
    if n in PAPER_SHAPES:
        return MeshShape(*PAPER_SHAPES[n])
    best = (n, 1, 1)
    for x in range(1, n + 1):
        for y in range(x, n + 1):
            if n % (x * y) == 0 and y <= n // (x * y):
                shape = (x, y, n // (x * y))
                if max(shape) < max(best):
                    best = shape
    return MeshShape(*best)


def make_mesh(shape: MeshShape | str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (x, y, z) mesh over `devices` (default: all). shape: '2x2x2', a MeshShape, or None (chosen from the count).

    Raises LayoutError (a UserError) when the shape does not multiply to the device count.
    """
    devices = list(devices if devices is not None else jax.devices())
    if not devices:
        raise LayoutError("make_mesh got no devices: pass at least one device (or None for all of jax.devices())")
    if shape is None:
        shape = default_shape(len(devices))
    elif isinstance(shape, str):
        shape = MeshShape.parse(shape)
    if shape.n != len(devices):
        hint = ""
        if devices[0].platform == "cpu":
            hint = f" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={shape.n} emulates {shape.n} devices)"
        raise LayoutError(
            f"mesh {shape} has {shape.n} chips (x*y*z) but there are {len(devices)} devices; "
            f"give a mesh whose sizes multiply to {len(devices)}{hint}"
        )
    return jax.make_mesh((shape.x, shape.y, shape.z), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def mesh_shape(mesh: Mesh) -> MeshShape:
    """The MeshShape of a (x, y, z) mesh."""
    return MeshShape(*(int(mesh.shape[a]) for a in MESH_AXES))
