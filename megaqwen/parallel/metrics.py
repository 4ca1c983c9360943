"""Throughput metrics of a distributed run: MFU against the device's peak, per-rank peak memory.

MFU = achieved model FLOP/s / (peak FLOP/s per device x devices), with model FLOPs per token from
`ModelConfig.flops_per_token(seq_len)`: 6 x (non-embedding params + LM head) + the causal attention
term 6 x layers x seq_len x q_width (PaLM appendix B). Recomputation is not counted (that would be
hardware FLOPs utilisation, HFU).

The peak is dense bf16 tensor-core FLOP/s from the vendors' datasheets (no 2:4 sparsity), looked up
by `torch.cuda.get_device_name()`; set `train.peak_flops` (FLOP/s per device) to override it or to get
an MFU on hardware not in the table. CPUs have no entry: MFU is omitted unless a peak is given.
"""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist

# substring of torch.cuda.get_device_name() -> dense bf16 FLOP/s per device. Order matters: the first
# match wins, so more specific names come first.
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),     # SXM5
    ("H200", 989e12),     # same compute as H100 SXM, more/faster HBM
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),      # AWS variant of A10
    ("A10", 125e12),
]


def device_peak_flops(device: torch.device, override: float = 0.0) -> float | None:
    """Peak FLOP/s of one device: the override when > 0, the table entry on CUDA, else None."""
    if override > 0:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS:
        if key in name:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_device: float | None,
        num_devices: int) -> float | None:
    """Model FLOPs utilisation in [0, 1] (None without a known peak). tokens_per_s is the global rate."""
    if not peak_flops_per_device:
        return None
    return flops_per_token * tokens_per_s / (peak_flops_per_device * num_devices)


def local_peak_memory_gib(device: torch.device) -> float:
    """This rank's peak: CUDA allocator peak, or the process's peak resident set on CPU.

    On Linux that is VmHWM (this address space's high-water mark). Not ru_maxrss: Linux carries it
    over from the parent through fork and exec, so a trainer started from a 1.5 GiB process (a
    notebook, a test runner) would report at least 1.5 GiB whatever it used itself."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            hwm_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return hwm_kib / 2**20
    except (OSError, StopIteration, ValueError):  # not Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # units as on Linux (KiB)


def peak_memory_per_rank(device: torch.device, max_ranks_listed: int = 16) -> dict[str, float]:
    """Collective. {"peak_mem_gib_max", "peak_mem_gib_min", "peak_mem_gib/rank{r}" for small worlds}."""
    mine = local_peak_memory_gib(device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {"peak_mem_gib_max": mine, "peak_mem_gib_min": mine, "peak_mem_gib/rank0": mine}
    world = dist.get_world_size()
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    allm = torch.zeros(world, dtype=torch.float64, device=dev)
    allm[dist.get_rank()] = mine
    dist.all_reduce(allm)  # each rank fills its own slot: a sum is a gather
    vals = allm.tolist()
    out = {"peak_mem_gib_max": max(vals), "peak_mem_gib_min": min(vals)}
    if world <= max_ranks_listed:
        out.update({f"peak_mem_gib/rank{r}": v for r, v in enumerate(vals)})
    return out
