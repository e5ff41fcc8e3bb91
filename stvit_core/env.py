"""The environment, for bug reports: torch's own ``torch.utils.collect_env`` plus the libraries stvit runs on."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Dict, List, Optional

import huggingface_hub
import safetensors
import timm
import torch
from torch.utils.collect_env import get_env_info

from .version import __version__


def _version_of(name: str) -> Optional[str]:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _lines(text: Optional[str]) -> List[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


#: Allocators that replace malloc when preloaded (LD_PRELOAD, or PyTorch's CPU launcher
#: ``python -m torch.backends.xeon.run_cpu``), by the library name they are mapped under.
_ALLOCATORS = ("tcmalloc", "jemalloc", "mimalloc")


def memory_allocator(maps: str = "/proc/self/maps") -> str:
    """The malloc this process runs on: ``tcmalloc``, ``jemalloc`` or ``mimalloc`` when one is mapped in,
    otherwise the C library's (``glibc`` on Linux, ``system`` elsewhere).

    Benchmarks record it because at detection sizes it moves CPU timings by tens of percent: glibc returns every
    block above its mmap threshold to the OS, so each forward faults fresh pages in (docs/dense-tasks.md).
    """
    try:
        with open(maps) as f:
            mapped = {line.rsplit("/", 1)[-1].strip() for line in f if "/" in line}
    except OSError:
        mapped = set()
    for name in _ALLOCATORS:
        if any(lib.startswith(f"lib{name}") for lib in mapped):
            return name
    return "glibc" if platform.libc_ver()[0] == "glibc" else "system"


def environment_info() -> Dict[str, Any]:
    """Versions of stvit, Python, torch, torchvision, timm, huggingface_hub and safetensors, the OS, CUDA
    (compiled and runtime), cuDNN, the driver, the GPUs, torch's CPU threads and the memory allocator."""
    sysenv = get_env_info()
    return {
        "stvit": __version__,
        "python": sysenv.python_version.split()[0],
        "platform": sysenv.python_platform,
        "os": sysenv.os,
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),
        "timm": timm.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": sysenv.cuda_compiled_version,
        "cuda_runtime": sysenv.cuda_runtime_version,
        "cudnn": sysenv.cudnn_version,
        "nvidia_driver": sysenv.nvidia_driver_version,
        "devices": _lines(sysenv.nvidia_gpu_models),
        "cpu_threads": torch.get_num_threads(),
        "memory_allocator": memory_allocator(),
        "pip_packages": _lines(sysenv.pip_packages),
    }
