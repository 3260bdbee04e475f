"""The chip table: every hardware constant the cost model uses, each with its source.

A `Chip` carries peak FLOP/s (bf16, int8), HBM size and bandwidth, the interconnect (bandwidth per link, links per
mesh axis, torus or switch, per-hop latency) and two achievable-fraction factors (matmul and HBM) that turn datasheet
peaks into what real kernels reach. The `local` chip is not in the table: `meshserve calibrate` measures it and stores
it as JSON (default ~/.cache/meshserve/local_chip.json, or $MESHSERVE_LOCAL_CHIP).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from meshserve.errors import UserError

__all__ = [
    "Chip",
    "ChipError",
    "CHIPS",
    "chip_names",
    "get_chip",
    "chip_for_device",
    "local_chip_path",
    "save_local_chip",
    "GiB",
]

GiB = 2**30
LOCAL_CHIP_ENV = "MESHSERVE_LOCAL_CHIP"


class ChipError(UserError):
    """Unknown chip name, or a `local` chip that has not been calibrated."""


@dataclass(frozen=True)
class Chip:
    """One accelerator. Bandwidths in bytes/s, FLOP/s per chip, latency in seconds.

    Collective bandwidth (see `collective_bandwidth`) follows the paper's network model: a collective over any mesh
    axes sees the chip's whole interconnect (torus: `links_per_axis` links of `link_bandwidth` on each torus
    dimension; PAPER.md's 270 GB/s for TPU v4), times `ici_efficiency`. Splitting the links per axis instead would
    make 1D weight-stationary beat 2D at 64 TPU v4 chips, against the paper's measurements. Behind a switch (NVLink)
    every GPU has `link_bandwidth` to the peers of its node and `inter_node_bandwidth` beyond `node_size` chips.
    """

    name: str
    peak_flops_bf16: float
    peak_flops_int8: float
    hbm_bytes: float
    hbm_bandwidth: float
    link_bandwidth: float  # one direction, per link (torus) or per GPU to the switch
    links_per_axis: int  # torus: 2 (both directions of the ring); switch: 1
    topology: Literal["torus3d", "torus2d", "switch", "none"]
    hop_latency_s: float  # per ring step of a collective (link latency plus synchronisation)
    matmul_efficiency: float  # achievable fraction of peak FLOP/s on large matmuls
    hbm_efficiency: float  # achievable fraction of HBM bandwidth on streaming reads
    ici_efficiency: float = 0.8  # achievable fraction of interconnect bandwidth in collectives
    kv_efficiency: float = 1.0  # KV-cache access relative to streaming weights (1 on accelerators; fitted for local)
    node_size: int = 0  # switch: GPUs per NVLink domain (0 = unlimited)
    inter_node_bandwidth: float = 0.0  # switch: per-GPU bandwidth between nodes
    step_overhead_s: float = 0.0  # fixed cost per layer per pass (kernel launches, host dispatch); measured for local
    source: str = ""

    def peak_flops(self, weights: str) -> float:
        """Peak matmul rate for the weight storage: int8 weights with bf16 activations run at the bf16 rate.

        The paper keeps activations bf16 (weight-only int8), so matmuls run at the bf16 rate on every chip here.
        """
        return self.peak_flops_bf16

    @property
    def interconnect_bandwidth(self) -> float:
        """Peak bytes/s one chip sends into the network (torus: every link; switch: its NVLink port)."""
        dims = {"torus3d": 3, "torus2d": 2}.get(self.topology, 1)
        return self.link_bandwidth * self.links_per_axis * dims

    def collective_bandwidth(self, within_node: bool = True) -> float:
        """Achieved bytes/s one chip moves in a collective (inter-node rate when it leaves an NVLink node)."""
        if self.topology == "switch" and not within_node and self.inter_node_bandwidth:
            return self.inter_node_bandwidth * self.ici_efficiency
        return self.interconnect_bandwidth * self.ici_efficiency

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Chip:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# Fitted once to PAPER.md's worked example (PaLM 540B, 64 TPU v4, the four columns), then held fixed for every other
# check: matmul efficiency from the 76% MFU of weight-gathered prefill at 1M tokens, ICI efficiency from the 43% MFU
# of 2D weight-stationary prefill at 2048 tokens (its communication is a third of the pass), hop latency from the
# 28.5 ms decode step at batch 64 (its matmul and weight-load terms are under half the step; the rest is ~3,500
# small collective steps per pass), HBM efficiency from the 36.9 ms bf16 decode step at batch 64 (the step that
# weight loading dominates: 0.84 gives 38.1 ms, 1.0 gives 35.3 ms, 0.90 gives 36.9 ms; no published HBM measurement
# behind it). Four constants, four worked-example numbers: checks of those cells are in-sample
# (tests/test_analytics_paper.py says which checks are independent).
_TPU_V4_FIT = dict(matmul_efficiency=0.80, hbm_efficiency=0.90, ici_efficiency=0.40, hop_latency_s=2.5e-6)
# Chips without published end-to-end numbers get the H100 measurement's ratios (PAPER.md: 690/989 TFLOP/s, 2.8/3.35
# TB/s), rounded: an assumption, flagged in `source`.
_ASSUMED = dict(matmul_efficiency=0.70, hbm_efficiency=0.84, ici_efficiency=0.70)
# TPU ICI per-hop latency without a fit: same as v4 (assumed). NVLink ring step: nccl-tests small-message all-gather
# on 8 GPUs takes ~10-20 us over 7 steps, i.e. ~2 us per step (order of magnitude).
_NVLINK_HOP_S = 2e-6

CHIPS: dict[str, Chip] = {
    "tpu-v4": Chip(
        name="tpu-v4",
        peak_flops_bf16=275e12,  # PAPER.md (Pope et al. sec. 2; Google Cloud TPU v4 datasheet)
        peak_flops_int8=275e12,  # Google Cloud TPU v4 datasheet: 275 TFLOP/s bf16 or int8
        hbm_bytes=32 * GiB,  # PAPER.md: 32 GiB HBM
        hbm_bandwidth=1200e9,  # PAPER.md: 1200 GB/s
        link_bandwidth=45e9,  # PAPER.md: 270 GB/s per chip over 6 torus links (±x, ±y, ±z)
        links_per_axis=2,
        topology="torus3d",
        **_TPU_V4_FIT,
        source="Pope et al. 2022 sec. 2 / PAPER.md; efficiencies and hop latency fitted to its worked example",
    ),
    "tpu-v5e": Chip(
        name="tpu-v5e",
        peak_flops_bf16=197e12,  # PAPER.md; Google Cloud TPU v5e datasheet
        peak_flops_int8=394e12,  # Google Cloud TPU v5e datasheet: 394 TOP/s int8
        hbm_bytes=16 * GiB,  # Google Cloud TPU v5e datasheet: 16 GiB HBM2
        hbm_bandwidth=810e9,  # PAPER.md: 810 GB/s
        link_bandwidth=45e9,  # PAPER.md: ICI 45 GB/s per link one way, 2D torus (4 links)
        links_per_axis=2,
        topology="torus2d",
        hop_latency_s=_TPU_V4_FIT["hop_latency_s"],
        **_ASSUMED,
        source="PAPER.md datasheet line; efficiencies and hop latency assumed",
    ),
    "tpu-v5p": Chip(
        name="tpu-v5p",
        peak_flops_bf16=459e12,  # PAPER.md; Google Cloud TPU v5p datasheet
        peak_flops_int8=918e12,  # Google Cloud TPU v5p datasheet: 918 TOP/s int8
        hbm_bytes=95e9,  # PAPER.md: 95 GB
        hbm_bandwidth=2760e9,  # PAPER.md: 2.76 TB/s
        link_bandwidth=90e9,  # PAPER.md: 90 GB/s per link, 3D torus
        links_per_axis=2,
        topology="torus3d",
        hop_latency_s=_TPU_V4_FIT["hop_latency_s"],
        **_ASSUMED,
        source="PAPER.md datasheet line; efficiencies and hop latency assumed",
    ),
    "tpu-v6e": Chip(
        name="tpu-v6e",
        peak_flops_bf16=918e12,  # PAPER.md; Google Cloud TPU v6e (Trillium) datasheet
        peak_flops_int8=1836e12,  # Google Cloud TPU v6e datasheet: 1836 TOP/s int8
        hbm_bytes=32 * GiB,  # PAPER.md: 32 GB
        hbm_bandwidth=1600e9,  # PAPER.md: 1.6 TB/s
        link_bandwidth=112e9,  # Google Cloud TPU v6e datasheet: ICI 3,584 Gbps per chip = 448 GB/s over 4 links
        links_per_axis=2,
        topology="torus2d",
        hop_latency_s=_TPU_V4_FIT["hop_latency_s"],
        **_ASSUMED,
        source="PAPER.md and Google Cloud datasheet; efficiencies and hop latency assumed",
    ),
    "a100-80g": Chip(
        name="a100-80g",
        peak_flops_bf16=312e12,  # PAPER.md; NVIDIA A100 datasheet (dense)
        peak_flops_int8=624e12,  # NVIDIA A100 datasheet: 624 TOP/s int8 dense
        hbm_bytes=80 * GiB,  # NVIDIA A100 80GB datasheet
        hbm_bandwidth=2.0e12,  # PAPER.md: 2.0 TB/s (datasheet 2,039 GB/s)
        link_bandwidth=300e9,  # PAPER.md: NVLink 300 GB/s per direction (600 GB/s bidirectional)
        links_per_axis=1,
        topology="switch",
        node_size=8,  # DGX/HGX A100: 8 GPUs per NVSwitch domain
        inter_node_bandwidth=25e9,  # DGX A100: one 200 Gb/s HDR InfiniBand port per GPU
        hop_latency_s=_NVLINK_HOP_S,
        **_ASSUMED,
        source="PAPER.md and NVIDIA datasheets; efficiencies assumed, hop latency from nccl-tests order of magnitude",
    ),
    "h100-sxm": Chip(
        name="h100-sxm",
        peak_flops_bf16=989e12,  # PAPER.md: 989 TFLOP/s dense bf16 (NVIDIA H100 SXM datasheet)
        peak_flops_int8=1979e12,  # NVIDIA H100 SXM datasheet: 1,979 TOP/s int8 dense
        hbm_bytes=80 * GiB,  # PAPER.md: 80 GB
        hbm_bandwidth=3.35e12,  # PAPER.md: 3.35 TB/s
        link_bandwidth=450e9,  # PAPER.md: NVLink 450 GB/s per direction
        links_per_axis=1,
        topology="switch",
        node_size=8,  # HGX H100: 8 GPUs per NVSwitch domain
        inter_node_bandwidth=50e9,  # DGX H100: one 400 Gb/s NDR InfiniBand port per GPU
        hop_latency_s=_NVLINK_HOP_S,
        matmul_efficiency=0.70,  # PAPER.md: measured bf16 8192^3 matmul ~690 TFLOP/s on one H100 with JAX
        hbm_efficiency=0.84,  # PAPER.md: measured streaming read ~2.8 TB/s
        ici_efficiency=0.70,  # assumed, as for the other chips without a fit
        source="PAPER.md (datasheet and one-H100 measurements) and NVIDIA datasheets",
    ),
    "h200": Chip(
        name="h200",
        peak_flops_bf16=989e12,  # NVIDIA H200 datasheet: same compute as H100 SXM
        peak_flops_int8=1979e12,  # NVIDIA H200 datasheet
        hbm_bytes=141e9,  # NVIDIA H200 datasheet: 141 GB HBM3e
        hbm_bandwidth=4.8e12,  # NVIDIA H200 datasheet: 4.8 TB/s
        link_bandwidth=450e9,  # NVIDIA H200 datasheet: NVLink 900 GB/s bidirectional
        links_per_axis=1,
        topology="switch",
        node_size=8,
        inter_node_bandwidth=50e9,  # 400 Gb/s NDR InfiniBand per GPU
        hop_latency_s=_NVLINK_HOP_S,
        # From meshserve's own runs on one H200 (BENCHMARKS.md), refitted to 2026-11-28's (benchmarks/results/
        # h200-2026-11-28/rows.json). HBM: 4.08 of 4.8 TB/s, the read stream the bench measured in that run (the
        # profile's GEMMs streamed weights at 3.8-4.2), not a fit. A fixed cost per layer per pass (the ~6 small
        # kernels and the attention kernel per layer the profile shows), fitted to falcon-7b's bf16 decode step at
        # batch 1 with the attention kernel (3.969 ms; 48.6 us per layer before the kernel and the fused output
        # projection, from 2026-11-27's 4.78 ms). Matmul: fitted to its 2048-token prefill (52.00 ms).
        # Out of sample: falcon-7b's bf16 batch-64 step (4.698 ms) +15%; palm-8b's bf16 batch 1 and 64 (4.642, 5.674
        # ms) +4%, +18%; the bf16 prefills of 128-token prompts -3% to +19%. int8 rows are predicted 17-46% under
        # the measured: the model streams int8 weights at the card's rate, which meshserve's int8 matmuls do not
        # reach yet (~2.3 TB/s in the profile).
        matmul_efficiency=0.622,
        hbm_efficiency=0.85,
        step_overhead_s=17.3e-6,
        ici_efficiency=0.70,  # assumed, as for the other chips without a fit
        source="NVIDIA H200 datasheet; matmul efficiency and per-layer overhead fitted to meshserve's H200 run "
        "(2026-11-28)",
    ),
}


def chip_names() -> list[str]:
    return [*CHIPS, "local"]


def local_chip_path() -> Path:
    """Where `meshserve calibrate` stores the `local` chip ($MESHSERVE_LOCAL_CHIP overrides)."""
    env = os.environ.get(LOCAL_CHIP_ENV)
    return Path(env) if env else Path.home() / ".cache" / "meshserve" / "local_chip.json"


def save_local_chip(chip: Chip, path: Path | None = None, warnings: Sequence[str] = ()) -> Path:
    """Write the chip as JSON atomically (a temporary file renamed into place). warnings (calibration's doubts about
    its own coefficients) are stored beside the fields as "warnings"; `Chip.from_dict` ignores them."""
    path = Path(path) if path else local_chip_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**chip.to_dict(), "warnings": list(warnings)}, indent=2) + "\n")
    tmp.replace(path)
    return path


# JAX device kinds (lower-cased substrings, first match wins: "v5p" before "v5") -> chip table names.
_CHIP_BY_DEVICE_KIND = (("h200", "h200"), ("h100", "h100-sxm"), ("a100", "a100-80g"), ("v6", "tpu-v6e"),
                        ("v5p", "tpu-v5p"), ("v5", "tpu-v5e"), ("v4", "tpu-v4"))  # fmt: skip


def chip_for_device(device_kind: str) -> str | None:
    """The chip table name for a JAX `device_kind` (e.g. 'NVIDIA H100 80GB HBM3' -> 'h100-sxm'), or None."""
    kind = device_kind.lower()
    return next((chip for key, chip in _CHIP_BY_DEVICE_KIND if key in kind), None)


def get_chip(name: str, local_path: Path | None = None) -> Chip:
    """A chip by name; `local` is read from the calibration file. Unknown names list the known ones."""
    if name == "local":
        path = Path(local_path) if local_path else local_chip_path()
        if not path.exists():
            raise ChipError(f"chip 'local' is not calibrated yet ({path} missing); run `meshserve calibrate` first")
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError(f"expected a JSON object of chip fields, got {type(data).__name__}")
            return Chip.from_dict(data)
        except (ValueError, TypeError, OSError) as e:
            raise ChipError(f"chip 'local': cannot read {path}: {e}") from None
    if name not in CHIPS:
        raise ChipError(f"unknown hardware {name!r}; known: {', '.join(chip_names())}")
    return CHIPS[name]
