"""What ran a computation, for the outputs that record it (embedding manifests, metrics
detail files): the torch version, the device, the CPU's vector capability or the GPU's
name, and the torch threads.

CPU runs are bitwise reproducible on the same CPU capability with the same threads and
torch; another capability (AVX2 vs AVX-512) or thread count changes float rounding, so
numbers differ in their last bits and, through training, a little more. These facts are
recorded, never fingerprinted: a shard is not recomputed because the machine changed.
"""

from __future__ import annotations

from typing import Any


def runtime(device: Any = "cpu") -> dict[str, Any]:
    """{torch, device, cpu_capability | gpu (+ cuda), threads, precision, deterministic} of
    this process now."""
    import torch

    from pipeline import compute

    dev = torch.device(str(device))
    info: dict[str, Any] = {"torch": torch.__version__, "device": str(dev)}
    if dev.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    else:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["threads"] = torch.get_num_threads()
    info["precision"] = compute.precision(dev)  # in force (`pipeline.compute`)
    info["deterministic"] = compute.deterministic()
    return info
