"""meshserve.partition: device meshes, the paper's layouts as data, and their collectives.

The bottom floor: imports nothing of meshserve but `errors`. The names below are pure Python (no JAX), so the
CLI's `--help` and analytics/ import them freely; mesh.py, ops.py, overlap.py and hlo.py load JAX and are
imported by their users (`from meshserve.partition.mesh import make_mesh`).
"""

from meshserve.partition.comm import (
    ATTENTION_LAYOUTS,
    FFN_LAYOUTS,
    MESH_AXES,
    Collective,
    LayerDims,
    LayoutError,
    MeshShape,
    layer_collectives,
    reshard_collectives,
    step_collectives,
)
from meshserve.partition.rules import Layout, Rules, rules_for

__all__ = [
    "MESH_AXES",
    "FFN_LAYOUTS",
    "ATTENTION_LAYOUTS",
    "MeshShape",
    "Collective",
    "LayerDims",
    "LayoutError",
    "layer_collectives",
    "reshard_collectives",
    "step_collectives",
    "Layout",
    "Rules",
    "rules_for",
]
