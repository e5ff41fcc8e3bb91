"""The model directory format: atomic saving, loading through stvit_core and timm, safe foreign loading."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import stvit_core
from stvit_core.checkpoint import load_state_dict_file, read_config
from stvit_core.errors import CheckpointError, OutputExistsError, StvitError
from stvit_core.files import atomic_directory

from .conftest import TINY_VIT


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, num_semantic_tokens=4).eval()


def test_round_trip_through_directory(tmp_path, tiny_model):
    out = stvit_core.save_model(tiny_model, tmp_path / "m", metadata={"source_model": "deit_tiny_patch16_224"})
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    cfg = read_config(out)
    assert cfg["architecture"] == "stvit_deit_tiny_patch16_224"
    assert cfg["model_args"]["num_semantic_tokens"] == 4
    assert cfg["stvit"]["source_model"] == "deit_tiny_patch16_224"

    loaded = stvit_core.load_model(out).eval()
    via_timm = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    for other in (loaded, via_timm):
        assert type(other) is type(tiny_model)
        for (k1, v1), (k2, v2) in zip(tiny_model.state_dict().items(), other.state_dict().items()):
            assert k1 == k2 and torch.equal(v1, v2)
        torch.testing.assert_close(other(x), tiny_model(x), rtol=0, atol=0)


def test_existing_directory_needs_force(tmp_path, tiny_model):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError):
        stvit_core.save_model(tiny_model, out)
    assert os.listdir(out) == ["keep.txt"]
    stvit_core.save_model(tiny_model, out, force=True)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_failure_inside_atomic_directory_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise RuntimeError("disk full")
    assert os.listdir(tmp_path) == []


def test_unwritable_parent_is_a_one_line_error(tmp_path, tiny_model):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StvitError, match="cannot write"):
        stvit_core.save_model(tiny_model, blocker / "m")


@pytest.mark.parametrize("layout", ["plain", "model", "state_dict", "module_prefix"])
def test_foreign_torch_files_are_unwrapped(tmp_path, tiny_model, layout):
    sd = tiny_model.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
    }[layout]
    path = tmp_path / "w.pth"
    torch.save(obj, path)
    loaded = load_state_dict_file(path)
    assert loaded.keys() == sd.keys()
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_safetensors_files_load(tmp_path, tiny_model):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model.state_dict().items()}, str(path))
    assert load_state_dict_file(path).keys() == tiny_model.state_dict().keys()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/stvit_pwned_marker",))


def test_pickled_code_is_not_executed(tmp_path):
    marker = "/tmp/stvit_pwned_marker"
    if os.path.exists(marker):
        os.unlink(marker)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Exploit()}, f)
    with pytest.raises(CheckpointError):
        load_state_dict_file(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("name, content", [
    ("garbage.pth", b"\x00garbage" * 100), ("random.pth", os.urandom(4096)), ("empty.pth", b""),
    ("text.pth", b"epoch,loss\n1,0.5\n"), ("zip.pt", b"PK\x03\x04" + b"\x00" * 100),
    ("weights.safetensors", b"not a safetensors header"),
])
def test_unreadable_files_say_so_and_never_advise_turning_safety_off(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        load_state_dict_file(path)
    message = str(err.value)
    kind = "safetensors file" if name.endswith(".safetensors") else "PyTorch checkpoint"
    assert message == f"cannot read {path}: not a {kind} (or corrupt)"
    assert "weights_only" not in message and "EOFError" not in message


def test_a_refused_pickle_names_the_global(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": _Exploit()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth: it needs the Python object posix\.system"):
        load_state_dict_file(path)
    assert not os.path.exists("/tmp/stvit_pwned_marker")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_state_dict_file(tmp_path / "w.pth")


def test_ema_weights_are_preferred_and_the_release_config_object_is_read(tmp_path, tiny_model):
    """timm's unwrapping: EMA weights first; a yacs CfgNode beside the weights (the STViT-R release) is read as
    a plain mapping, never executed."""
    sd = tiny_model.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    path = tmp_path / "ema.pth"
    torch.save({"model": sd, "model_ema": ema, "epoch": 3}, path)
    assert all(torch.equal(v, ema[k]) for k, v in load_state_dict_file(path).items())


@pytest.mark.parametrize("change, expected", [
    ({"depth": 13}, "missing semantic_blocks.6.norm1.weight, semantic_blocks.6.norm1.bias, "
                    "semantic_blocks.6.attn.qkv.weight (+9 more)"),
    ({"num_semantic_tokens": 9}, "shape mismatch semantic_token_generator.global_semantic_tokens (file [1, 4, 48], "
                                 "model [1, 9, 48])"),
    ({"depth": 11}, "unexpected semantic_blocks.5.attn.proj.bias"),
])
def test_a_directory_whose_config_and_weights_disagree_names_the_keys(tmp_path, tiny_model, change, expected):
    out = stvit_core.save_model(tiny_model, tmp_path / "m")
    cfg = json.loads((out / "config.json").read_text())
    cfg["model_args"].update(change)
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        stvit_core.load_model(out)
    assert str(err.value).startswith(f"cannot load {out}: config.json and model.safetensors disagree: ")
    assert expected in str(err.value)


def test_hub_models_fail_at_once_offline_and_say_offline_mode(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from stvit_core.errors import DownloadError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for spec in ("hf-hub:alice/stvit-x", "hf-hub:alice/stvit-x@dev", "deit_tiny_patch16_224.fb_in1k"):
        with pytest.raises(DownloadError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
            stvit_core.load_model(spec)


def test_hub_models_fail_at_once_when_the_endpoint_is_unreachable(monkeypatch, tmp_path):
    import socket

    from huggingface_hub import constants

    from stvit_core.errors import DownloadError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(DownloadError, match=f"cannot connect to {url}"):
        stvit_core.load_model("hf-hub:alice/stvit-x")


def test_load_model_errors(tmp_path, tiny_model):
    with pytest.raises(CheckpointError, match="config.json is missing"):
        stvit_core.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        stvit_core.load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "no_such_net"}))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        stvit_core.load_model(tmp_path)
    out = stvit_core.save_model(tiny_model, tmp_path / "m")
    (out / "model.safetensors").write_bytes(b"corrupt")
    with pytest.raises(CheckpointError, match="cannot load"):
        stvit_core.load_model(out)
    with pytest.raises(StvitError, match="unknown model"):
        stvit_core.load_model("definitely_not_a_model")


def test_already_an_stvit_model_is_recognised(tmp_path, tiny_model):
    from stvit_core.checkpoint import looks_like_stvit

    assert looks_like_stvit(tiny_model.state_dict())
    assert not looks_like_stvit(timm.create_model("deit_tiny_patch16_224", **TINY_VIT).state_dict())


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_permissions_of_the_umask(tmp_path, tiny_model, umask):
    # Temporary names are private (0600/0700); what is renamed into place must be readable like any file.
    from stvit_core.files import atomic_write_bytes

    old = os.umask(umask)
    try:
        out = stvit_core.save_model(tiny_model, tmp_path / "m")
        atomic_write_bytes(tmp_path / "metrics.csv", b"epoch\n1\n")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    for f in (out / "config.json", out / "model.safetensors", tmp_path / "metrics.csv"):
        assert (f.stat().st_mode & 0o777) == 0o666 & ~umask, f
