"""Fixtures for the Hub tests: a loopback Hub server, the environment for a CLI run, a tiny model.

The CLI runs (in the test process or a fresh one) with HF_ENDPOINT pointing at the loopback server (huggingface_hub
reads it at import time), HF_HUB_DISABLE_XET=1 and a fresh HF_HOME, so nothing touches the user's cache or login.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional

import pytest
import timm
import torch
from huggingface_hub.utils import disable_progress_bars

from stvit_core import save_model

from .hub_server import HubServer

REPO_ROOT = Path(__file__).resolve().parents[1]
# Random per test session, so a token found in an output can only have come from the code under test.
ALICE_TOKEN = "hf_" + secrets.token_hex(16)
BOB_TOKEN = "hf_" + secrets.token_hex(16)
BAD_TOKEN = "hf_" + secrets.token_hex(16)
TINY_ARCH = "stvit_deit_tiny_patch16_224"
USERS = {ALICE_TOKEN: ("alice", ["stvit-org"]), BOB_TOKEN: ("bob", [])}


@pytest.fixture
def hub_server(tmp_path_factory) -> HubServer:
    """A fresh loopback Hub (users alice and bob) for one test."""
    disable_progress_bars()  # for the in-process pushes and pulls (subprocesses get the env variable)
    with HubServer(tmp_path_factory.mktemp("hub-storage"), USERS) as server:
        yield server


def hub_env(server_url: str, hf_home: Path, token: Optional[str] = None) -> Dict[str, str]:
    """Environment for a CLI run talking to ``server_url`` with its own HF_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update({
        "HF_ENDPOINT": server_url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(hf_home),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
    })
    if token:
        env["HF_TOKEN"] = token
    return env


def run_python(code: str, env: Dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO_ROOT))


def make_tiny_model(path: Path, *, seed: int = 0, metadata: Optional[dict] = None) -> Path:
    """Save a tiny STViT-DeiT (real architecture, 48 wide, 32 px images) in stvit's checkpoint format."""
    torch.manual_seed(seed)
    kwargs = dict(img_size=32, patch_size=8, embed_dim=48, depth=12, num_heads=3, num_classes=10,
                  num_semantic_tokens=4)
    model = timm.create_model(TINY_ARCH, pretrained=False, **kwargs)
    meta = {"source_model": "deit_tiny_patch16_224.fb_in1k", "num_semantic_tokens": 4, "gflops": 0.01,
            "base_gflops": 0.02, "base_params_m": 0.1}
    meta.update(metadata or {})
    return save_model(model, path, metadata=meta, model_args=kwargs)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")
