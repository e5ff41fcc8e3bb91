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
                   "--output", out, "--json", check=True, fresh_process=True)
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


def test_checkpoint_errors(tmp_path, tiny_vit_checkpoint):
    out = tmp_path / "o"
    assert_one_line_error(run_cli("convert", "deit_tiny", "--checkpoint", tmp_path / "missing.pth", "--output", out),
                          "not found")
    # a DeiT-Tiny checkpoint offered as DeiT-Small: the first keys whose shapes differ, with both shapes
    assert_one_line_error(run_cli("convert", "deit_small", "--checkpoint", tiny_vit_checkpoint, "--output", out),
                          "does not fit", "shape mismatch", "cls_token (file [1, 1, 192], model [1, 1, 384])")
    assert not out.exists()
    assert _no_leftovers(tmp_path)


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


def _in_process(args, cwd):
    return run_cli(*args, cwd=cwd)


def test_default_output_names_are_the_ones_the_help_states(tmp_path):
    """The help names every default output pattern, and each conversion writes exactly that directory."""
    help_text = " ".join(_in_process(["convert", "--help"], tmp_path).stdout.split())
    for pattern in ("./stvit-MODEL-tTOKENS", "./stvit-r-MODEL-tTOKENS with --recovery",
                    "./stvit-r-MODEL-wTOKENS_PER_WINDOW for Swin"):
        assert pattern in help_text, pattern
    for args, expected in ((["deit_tiny", "--tokens", "36"], "stvit-deit_tiny-t36"),
                           (["deit_tiny", "--recovery"], "stvit-r-deit_tiny-t16"),
                           (["swin_tiny", "--tokens-per-window", "4", "--img-size", "64"], "stvit-r-swin_tiny-w4")):
        result = _in_process(["convert", *args, "--no-pretrained", "--json"], tmp_path)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["output"] == expected
        assert (tmp_path / expected / "model.safetensors").is_file()
    assert sorted(os.listdir(tmp_path)) == ["stvit-deit_tiny-t36", "stvit-r-deit_tiny-t16", "stvit-r-swin_tiny-w4"]


def test_a_conversion_that_costs_more_says_more(tmp_path):
    # 196 semantic tokens on 196 patches: the generator adds work, so the model grows
    result = _in_process(["convert", "deit_tiny", "--tokens", "196", "--no-pretrained", "-o", tmp_path / "o"], tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if "GFLOPs" in ln)
    assert line.endswith("% more)") and "-" not in line.split("(")[1], line


def test_swin_conversion_uses_the_tokens_per_window_it_was_given(tmp_path):
    result = _in_process(["convert", "swin_tiny", "--tokens-per-window", "16", "--img-size", "64", "--no-pretrained",
                          "-o", tmp_path / "o", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tokens_per_window"] == 16
    assert stvit_core.load_model(tmp_path / "o").semantic_tokens_per_window == 16


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
