"""Shared fixtures: a CLI runner (real subprocesses), tiny models, and thread limits for a 2-core machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Keep each test process light: CI has 2 cores.
torch.set_num_threads(1)

# Small STViT-DeiT settings: real architecture, tiny width, so tests run in seconds.
TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=3, num_classes=10)


def cli_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1")  # tests never reach the real Hub
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if extra:
        env.update(extra)
    return env


def run_cli(*args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run ``python -m stvit_cli ARGS`` in a real subprocess and return the completed process."""
    proc = subprocess.run(
        [sys.executable, "-m", "stvit_cli", *map(str, args)],
        capture_output=True, text=True, env=cli_env(env), cwd=cwd, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"stvit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    """A failed command: non-zero exit, no traceback, one 'Error: ...' line naming the fragments."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def tiny_vit_checkpoint(tmp_path: Path) -> Path:
    """A real DeiT-Tiny-shaped (patch 16, 224 px) checkpoint file, randomly initialised, as a user would have."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 300}, path)
    return path


from .hub_fixtures import hub_server, tiny_model_dir  # noqa: E402,F401  (loopback Hub server fixtures)
