"""``stvit env``: versions and devices, for bug reports."""

from __future__ import annotations

import json
import platform

import click


def collect_env() -> dict:
    import huggingface_hub
    import safetensors
    import timm
    import torch

    import stvit_core

    info = {
        "stvit": stvit_core.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),
        "timm": timm.__version__,
        "huggingface_hub": huggingface_hub.__version__,
        "safetensors": safetensors.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "cpu_threads": torch.get_num_threads(),
    }
    return info


def _version_of(name: str):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env(as_json: bool) -> None:
    """Print the versions of stvit, Python, torch, timm and CUDA, and the devices.

    \b
    Examples:
      stvit env
      stvit env --json
    """
    info = collect_env()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "none"
        click.echo(f"{key:<{width}}  {value}")
