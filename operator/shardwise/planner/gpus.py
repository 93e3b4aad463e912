"""GPU catalog: memory, peak dense 16-bit TFLOP/s, intra-node and host bandwidth; GFD label lookup."""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardwise.planner.errors import PlanInputError
from shardwise.planner.units import MIB

# Defaults for a GPU known only by its memory (an unknown product, or the CPU demo). They only
# affect the step-time ranking, never feasibility; a note in the result says they were used.
UNKNOWN_TFLOPS = 100e12
UNKNOWN_BANDWIDTH = 32e9  # PCIe Gen4 x16, one direction


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU model. Bandwidths are bytes/s in one direction per GPU (nominal, as NVIDIA quotes
    them halved from their bidirectional figure); FLOP/s is dense (no sparsity) bf16/fp16."""

    name: str
    memory_bytes: int
    peak_flops: float = UNKNOWN_TFLOPS
    intra_node_bandwidth: float = UNKNOWN_BANDWIDTH
    host_bandwidth: float = UNKNOWN_BANDWIDTH
    interconnect: str = "PCIe"
    bf16: bool = True
    labels: tuple[str, ...] = ()
    known: bool = True

    def with_memory(self, memory_bytes: int) -> GpuSpec:
        """Same GPU with a memory override (resources.gpuMemory / --gpu-memory)."""
        return GpuSpec(
            self.name,
            memory_bytes,
            self.peak_flops,
            self.intra_node_bandwidth,
            self.host_bandwidth,
            self.interconnect,
            self.bf16,
            self.labels,
            self.known,
        )


# Memory is what the GPU Feature Discovery label nvidia.com/gpu.memory reports (MiB, as nvidia-smi).
GPUS: tuple[GpuSpec, ...] = (
    GpuSpec(
        "H200",
        143771 * MIB,
        989e12,
        450e9,
        64e9,
        "NVLink 4 (900 GB/s bidirectional)",
        labels=("NVIDIA-H200", "NVIDIA-H200-SXM5-141GB", "NVIDIA-H200-141GB-HBM3e"),
    ),
    GpuSpec(
        "H100-80GB-SXM",
        81559 * MIB,
        989e12,
        450e9,
        64e9,
        "NVLink 4 (900 GB/s bidirectional)",
        labels=("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-SXM5-80GB", "H100", "H100-SXM", "H100-80GB"),
    ),
    GpuSpec(
        "H100-80GB-PCIe",
        81559 * MIB,
        756e12,
        64e9,
        64e9,
        "PCIe Gen5 x16",
        labels=("NVIDIA-H100-PCIe", "NVIDIA-H100-80GB-PCIe", "H100-PCIe"),
    ),
    GpuSpec(
        "A100-80GB",
        81920 * MIB,
        312e12,
        300e9,
        32e9,
        "NVLink 3 (600 GB/s bidirectional)",
        labels=("NVIDIA-A100-SXM4-80GB", "A100-SXM4-80GB", "A100-80GB-SXM"),
    ),
    GpuSpec(
        "A100-80GB-PCIe",
        81920 * MIB,
        312e12,
        32e9,
        32e9,
        "PCIe Gen4 x16",
        labels=("NVIDIA-A100-80GB-PCIe", "NVIDIA-A100-PCIE-80GB"),
    ),
    GpuSpec(
        "A100-40GB",
        40960 * MIB,
        312e12,
        300e9,
        32e9,
        "NVLink 3 (600 GB/s bidirectional)",
        labels=("NVIDIA-A100-SXM4-40GB", "NVIDIA-A100-PCIE-40GB", "A100", "A100-SXM4-40GB"),
    ),
    GpuSpec("L40S", 46068 * MIB, 362e12, 32e9, 32e9, "PCIe Gen4 x16 (no NVLink)", labels=("NVIDIA-L40S",)),
    # GeForce: 16-bit tensor FLOP/s with fp32 accumulation (what training uses); no NVLink or
    # peer-to-peer on the 4090, so TP traffic crosses PCIe.
    GpuSpec(
        "RTX-4090",
        24564 * MIB,
        165.2e12,
        32e9,
        32e9,
        "PCIe Gen4 x16 (no P2P)",
        labels=("NVIDIA-GeForce-RTX-4090", "RTX4090", "4090"),
    ),
    GpuSpec(
        "RTX-3090",
        24576 * MIB,
        71e12,
        32e9,
        32e9,
        "PCIe Gen4 x16",
        labels=("NVIDIA-GeForce-RTX-3090", "RTX3090", "3090"),
    ),
    # Volta has no bf16: fp16 tensor-core peak.
    GpuSpec(
        "V100-32GB",
        32768 * MIB,
        125e12,
        150e9,
        16e9,
        "NVLink 2 (300 GB/s bidirectional)",
        bf16=False,
        labels=("Tesla-V100-SXM2-32GB", "NVIDIA-V100-SXM2-32GB", "V100", "Tesla-V100-PCIE-32GB"),
    ),
)


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY: dict[str, GpuSpec] = {}
for _gpu in GPUS:
    for _name in (_gpu.name, *_gpu.labels):
        _BY_KEY.setdefault(_key(_name), _gpu)


def find_gpu(name: str) -> GpuSpec | None:
    """Catalog entry for a catalog name or GFD product label (case and punctuation ignored)."""
    return _BY_KEY.get(_key(name))


def gpu(name: str | None, memory_bytes: int | None = None) -> GpuSpec:
    """Resolve a GPU: a known name/label (memory optionally overridden) or any name with memory."""
    if name:
        found = find_gpu(name)
        if found is not None:
            return found if memory_bytes is None else found.with_memory(memory_bytes)
        if memory_bytes is None:
            raise PlanInputError(f"unknown GPU {name!r}: give its memory (--gpu-memory, resources.gpuMemory)")
        return GpuSpec(name, memory_bytes, known=False)
    if memory_bytes is None:
        raise PlanInputError("no GPU given: set --gpu or --gpu-memory (resources.gpuProduct / gpuMemory)")
    return GpuSpec("unknown", memory_bytes, known=False)
