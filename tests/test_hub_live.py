"""Opt-in: push and pull against the real Hugging Face Hub.

Skipped unless STVIT_LIVE_HUB_TOKEN holds a write token. It creates a private repo
``USER/stvit-live-test-RANDOM`` and deletes it afterwards. STVIT_LIVE_HUB_ENDPOINT picks another
endpoint (default https://huggingface.co). Run: ``STVIT_LIVE_HUB_TOKEN=hf_... pytest -m live_hub``.
"""

from __future__ import annotations

import os
import secrets

import pytest
import torch
from safetensors.torch import load_file

from .hub_fixtures import make_tiny_model

TOKEN = os.environ.get("STVIT_LIVE_HUB_TOKEN")
ENDPOINT = os.environ.get("STVIT_LIVE_HUB_ENDPOINT", "https://huggingface.co")

pytestmark = [pytest.mark.live_hub, pytest.mark.skipif(not TOKEN, reason="set STVIT_LIVE_HUB_TOKEN to run")]


def test_push_and_pull_on_the_real_hub(tmp_path):
    from huggingface_hub import HfApi

    from stvit_core.hub import pull_from_hub, push_to_hub

    api = HfApi(endpoint=ENDPOINT, token=TOKEN)
    repo_id = f"{api.whoami()['name']}/stvit-live-test-{secrets.token_hex(4)}"
    model_dir = make_tiny_model(tmp_path / "model")
    try:
        pushed = push_to_hub(model_dir, repo_id, private=True, token=TOKEN, endpoint=ENDPOINT)
        assert pushed.private and not pushed.unchanged
        assert push_to_hub(model_dir, repo_id, token=TOKEN, endpoint=ENDPOINT).unchanged
        pulled = pull_from_hub(repo_id, output_dir=tmp_path / "out", token=TOKEN, endpoint=ENDPOINT)
        assert pulled.commit_oid in (None, pushed.commit_oid)
        original = load_file(model_dir / "model.safetensors")
        downloaded = load_file(tmp_path / "out" / "model.safetensors")
        assert original.keys() == downloaded.keys()
        assert all(torch.equal(original[k], downloaded[k]) for k in original)
    finally:
        api.delete_repo(repo_id, missing_ok=True)
