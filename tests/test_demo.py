"""`stvit demo`: the README's main job, end to end on the embedded data, in a real subprocess."""

from __future__ import annotations

import json
import os

import pytest

import stvit_core

from .conftest import assert_one_line_error, run_cli


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("demo", "--output", out, "--epochs", "1", "--json", check=True, fresh_process=True)
    result = json.loads(proc.stdout)
    assert result["images"] == 500 and result["tokens"] == 16
    assert result["top1"] > 15.0, "one epoch on real data must beat chance (10%)"
    assert result["speedup"] > 0 and result["deit_small_speedup"] > 0
    assert result["gflops"] < result["base_gflops"]
    # every stage left its product: the converted model, the fine-tuned best model loads
    assert (out / "converted" / "model.safetensors").is_file()
    model = stvit_core.load_model(result["model"])
    assert model.num_semantic_tokens == 16 and model.num_classes == 10
    # the figures it printed are kept, written atomically (no temporary file left beside them)
    assert json.loads((out / "summary.json").read_text()) == result
    assert not [p for p in os.listdir(out) if p.startswith(".")]


def test_demo_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    assert_one_line_error(run_cli("demo", "--output", tmp_path), "already exists", "--force")


@pytest.mark.slow
def test_an_interrupted_demo_says_to_run_it_again_not_to_resume(tmp_path):
    """train() says 'continue with --resume FILE', an option the demo does not have."""
    import signal
    import subprocess
    import sys
    import time

    from .conftest import cli_env

    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "stvit_cli", "demo", "--output", str(out), "--epochs", "3"],
                            env=cli_env(None), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "finetune" / "config.yaml").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    lines = [ln for ln in stderr.splitlines() if ln.startswith("Error:")]
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and "--resume" not in stderr, stderr
    assert "run again" in lines[0] and "--force" in lines[0], lines
