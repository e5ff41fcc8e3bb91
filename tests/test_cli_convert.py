"""`stvit convert` through real subprocesses: outputs, JSON, and every bad input as one line."""

from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

import stvit_core

from .conftest import assert_one_line_error, run_cli


def _no_leftovers(parent):
    return [p for p in os.listdir(parent) if p.startswith(".")] == []


@pytest.mark.slow
def test_convert_from_checkpoint_json_summary_and_reload(tmp_path, tiny_vit_checkpoint):
    out = tmp_path / "stvit-t"
    proc = run_cli("convert", "deit_tiny", "--tokens", "36", "--checkpoint", tiny_vit_checkpoint,
                   "--output", out, "--json", check=True)
    summary = json.loads(proc.stdout)
    assert summary["model"] == "stvit_deit_tiny_patch16_224"
    assert summary["tokens"] == 36
    assert summary["output"] == str(out)
    assert summary["base_gflops"] == pytest.approx(1.26, rel=0.025)
    assert summary["gflops"] == pytest.approx(0.60, rel=0.025)
    assert 0 < summary["params_m"] - summary["base_params_m"] < 0.01  # only the global tokens are new
    model = stvit_core.load_model(out)
    src = torch.load(tiny_vit_checkpoint, weights_only=True)["model"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, src["blocks.0.attn.qkv.weight"])
    assert torch.equal(model.semantic_token_generator.layers[0].attn.q.weight, src["blocks.4.attn.qkv.weight"][:192])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["stvit"]["source_weights"] == str(tiny_vit_checkpoint)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_convert_accepts_safetensors_and_bin(tmp_path, fmt):
    src = timm.create_model("deit_tiny_patch16_224")
    path = tmp_path / f"weights.{fmt}"
    if fmt == "safetensors":
        save_file(src.state_dict(), str(path))
    else:
        torch.save({"state_dict": src.state_dict()}, path)
    run_cli("convert", "deit_tiny", "--checkpoint", path, "--output", tmp_path / "o", check=True)
    model = stvit_core.load_model(tmp_path / "o")
    assert torch.equal(model.head.weight, src.head.weight)


def test_human_output_names_flops_and_path(tmp_path):
    proc = run_cli("convert", "deit_tiny", "--no-pretrained", "--output", tmp_path / "o", check=True)
    assert "GFLOPs" in proc.stdout and str(tmp_path / "o") in proc.stdout


def test_default_output_directory_and_force(tmp_path):
    run_cli("convert", "deit_tiny", "--no-pretrained", cwd=tmp_path, check=True)
    out = tmp_path / "stvit-deit_tiny-t16"
    assert (out / "model.safetensors").is_file()
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert_one_line_error(run_cli("convert", "deit_tiny", "--no-pretrained", cwd=tmp_path), "already exists", "--force")
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    run_cli("convert", "deit_tiny", "--no-pretrained", "--force", "--tokens", "64", "--output", out.name,
            cwd=tmp_path, check=True)
    assert json.loads((out / "config.json").read_text())["model_args"]["num_semantic_tokens"] == 64
    assert _no_leftovers(tmp_path)


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--tokens", "15"], ["perfect square"]),
        (["--tokens", "256"], ["exceeds"]),
        (["--tokens", "0"], ["perfect square"]),
    ],
)
def test_bad_token_counts(tmp_path, args, fragments):
    proc = run_cli("convert", "deit_tiny", "--no-pretrained", "--output", tmp_path / "o", *args)
    assert_one_line_error(proc, *fragments)
    assert os.listdir(tmp_path) == []


def test_unknown_model(tmp_path):
    assert_one_line_error(run_cli("convert", "deit_huge_nonsense", "--output", tmp_path / "o"), "unknown model")
    assert_one_line_error(run_cli("convert", "resnet18", "--no-pretrained", "--output", tmp_path / "o"), "DeiT/ViT")
    assert os.listdir(tmp_path) == []


def test_checkpoint_errors(tmp_path, tiny_vit_checkpoint):
    out = tmp_path / "o"
    assert_one_line_error(run_cli("convert", "deit_tiny", "--checkpoint", tmp_path / "missing.pth", "--output", out),
                          "not found")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(4096))
    assert_one_line_error(run_cli("convert", "deit_tiny", "--checkpoint", corrupt, "--output", out), "cannot read")
    # a DeiT-Tiny checkpoint offered as DeiT-Small
    assert_one_line_error(run_cli("convert", "deit_small", "--checkpoint", tiny_vit_checkpoint, "--output", out),
                          "does not fit", "size mismatch")
    not_weights = tmp_path / "list.pth"
    torch.save([1, 2, 3], not_weights)
    assert_one_line_error(run_cli("convert", "deit_tiny", "--checkpoint", not_weights, "--output", out),
                          "state dict")
    assert not out.exists()
    assert _no_leftovers(tmp_path)


def test_unwritable_output(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(run_cli("convert", "deit_tiny", "--no-pretrained", "--output", blocker / "o"), "cannot write")


def test_offline_download_fails_fast_naming_checkpoint(tmp_path):
    proc = run_cli("convert", "deit_tiny", "--output", tmp_path / "o", env={"HF_HOME": str(tmp_path / "hf")})
    assert_one_line_error(proc, "--checkpoint", "--no-pretrained")
    assert not (tmp_path / "o").exists()


def test_unreachable_endpoint_fails_fast(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    proc = run_cli("convert", "deit_tiny", "--output", tmp_path / "o", env=env, timeout=60)
    assert_one_line_error(proc, "unreachable", "--checkpoint")


def test_checkpoint_and_no_pretrained_conflict(tmp_path, tiny_vit_checkpoint):
    proc = run_cli("convert", "deit_tiny", "--no-pretrained", "--checkpoint", tiny_vit_checkpoint, "--output", tmp_path / "o")
    assert_one_line_error(proc, "exclude")


def test_version_env_and_help():
    proc = run_cli("--version", check=True)
    assert stvit_core.__version__ in proc.stdout
    info = json.loads(run_cli("env", "--json", check=True).stdout)
    assert info["torch"] == torch.__version__ and info["timm"] == timm.__version__
    assert "cuda_available" in info
    top = run_cli("--help", check=True).stdout
    commands = [line.split()[0] for line in top.split("Commands:")[1].strip().splitlines() if line.strip()]
    assert {"convert", "benchmark", "env"} <= set(commands)
    for command in commands:
        sub = run_cli(command, "--help", check=True).stdout
        assert "Examples:" in sub or "Commands:" in sub, command


def test_help_version_and_usage_errors_do_not_import_torch():
    # `stvit --help` used to take seconds: importing stvit_core imports timm and torch.
    import subprocess
    import sys

    code = ("import sys\nfrom stvit_cli.main import cli\n"
            "for args in (['--help'], ['--version'], ['finetune', '--help'], ['convert']):\n"
            "    try:\n        cli(args, prog_name='stvit')\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'timm', 'stvit_core') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert "stvit " + stvit_core.__version__ in proc.stdout
