"""benchmarks/gpu_suite.py end to end on the CPU (--quick), as a real process: every pair runs in its own
process, failures stay one line in the results, the JSON and the markdown table hold every pair. No timing is
asserted (the figures are whatever this machine gives)."""

from __future__ import annotations

import json
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

from .conftest import REPO_ROOT, cli_env

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_suite.py"
PAIRS = ["deit_s", "deit_s_same_embed", "deit_s_compile", "deit_s_graphs", "deit_t", "deit_t_graphs", "deit_b",
         "swin_s", "train_deit_s", "train_deit_s_compile", "train_deit_s_graphs", "latency_deit_s", "onnx_deit_s"]
LABELS = {
    "deit_s": "STViT-DeiT-S(16) vs DeiT-S, eager",
    "deit_s_same_embed": "STViT-DeiT-S(16) vs DeiT-S with the same GEMM patch embedding, eager",
    "deit_s_compile": "STViT-DeiT-S(16) vs DeiT-S, torch.compile",
    "deit_s_graphs": "STViT-DeiT-S(16) vs DeiT-S, torch.compile reduce-overhead (CUDA graphs)",
    "deit_t": "STViT-DeiT-T(16) vs DeiT-T, eager",
    "deit_t_graphs": "STViT-DeiT-T(16) vs DeiT-T, torch.compile reduce-overhead (CUDA graphs)",
    "deit_b": "STViT-DeiT-B(16) vs DeiT-B, eager",
    "swin_s": "STViT-R-Swin-S(9) vs Swin-S (fused attention), eager",
    "train_deit_s": "training step (fwd + bwd + AdamW) STViT-DeiT-S(16) vs DeiT-S",
    "train_deit_s_compile": "training step (fwd + bwd + AdamW) STViT-DeiT-S(16) vs DeiT-S, torch.compile",
    "train_deit_s_graphs": "training step (fwd + bwd + AdamW) STViT-DeiT-S(16) vs DeiT-S, torch.compile "
                           "reduce-overhead (CUDA graphs)",
    "latency_deit_s": "batch-1 latency, torch.compile reduce-overhead (CUDA graphs)",
    "onnx_deit_s": "ONNX Runtime CUDA EP (fp32), STViT-DeiT-S(16) vs DeiT-S",
}
TARGETS = {"deit_s": 2.2, "deit_s_same_embed": None, "deit_s_compile": 2.2, "deit_s_graphs": 2.2, "deit_t": 2.0,
           "deit_t_graphs": 2.0, "deit_b": 2.2, "swin_s": 1.3, "train_deit_s": 1.8, "train_deit_s_compile": 1.8,
           "train_deit_s_graphs": 1.8, "latency_deit_s": 1.0, "onnx_deit_s": None}


def run_suite(*args: str, env: dict = None, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=cli_env(env), cwd=REPO_ROOT, timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def docs_quick_command() -> list:
    """The CPU command docs/benchmarks.md gives after ``<!-- gpu-suite-quick -->``, as arguments."""
    text = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    match = re.search(r"<!-- gpu-suite-quick -->\s*```bash\n(.*?)\n```", text, re.S)
    assert match, "docs/benchmarks.md has no gpu-suite-quick command"
    words = shlex.split(match.group(1))
    assert words[:2] == ["python", "benchmarks/gpu_suite.py"]
    return words[2:]


def only_files(directory: Path) -> Sequence[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.slow
def test_quick_suite_runs_every_pair_in_its_own_process_and_reports_failures(tmp_path):
    out = tmp_path / "results"
    # deit_t raises in its process, deit_b's process dies without a result: both are recorded, the rest runs
    args = docs_quick_command()
    args[args.index("--output-dir") + 1] = str(out)
    assert {"--quick", "cpu", "all"} <= set(args)
    proc = run_suite(*args, env={"STVIT_GPU_SUITE_INJECT_FAILURE": "deit_t,deit_b:exit"})
    assert proc.returncode == 1, proc.stderr[-3000:]  # two pairs failed; every other one was measured
    assert "2 pair(s) failed: deit_t, deit_b" in proc.stdout
    assert "Traceback" not in proc.stdout
    files = only_files(out)
    stem = files[0].split(".")[0]
    assert stem.startswith("gpu_cpu_")
    assert files == [f"{stem}.json", f"{stem}.md", f"{stem}_profile.md"]  # temporaries renamed, none left

    report = json.loads((out / f"{stem}.json").read_text())
    assert report["settings"]["device"] == "cpu" and report["settings"]["quick"] is True
    assert report["settings"]["dtype"] == "fp32"
    assert "--quick" in report["command"]
    env = report["environment"]
    assert env["torch"] and env["timm"] and env["stvit"]
    assert list(report["pairs"]) == PAIRS
    for name, pair in report["pairs"].items():
        assert pair["target"] == TARGETS[name]
        assert pair["elapsed_s"] >= 0
    pairs = report["pairs"]

    assert pairs["deit_t"]["status"] == "error"
    assert "injected failure" in pairs["deit_t"]["error"] and "\n" not in pairs["deit_t"]["error"]
    assert pairs["deit_b"]["status"] == "error" and "exited with code 3" in pairs["deit_b"]["error"]
    onnx = pairs["onnx_deit_s"]
    assert onnx["status"] == "skipped" and "CUDA" in onnx["reason"]

    measured = [n for n in PAIRS if n not in ("deit_t", "deit_b", "onnx_deit_s")]
    for name in measured:
        pair = pairs[name]
        assert pair["status"] == "ok", (name, pair)
        met = None if TARGETS[name] is None else pair["speedup"] >= TARGETS[name]
        assert pair["speedup"] > 0 and pair["met"] == met
        for role, model in (("stvit", pair["stvit"]), ("base", pair["base"])):
            m = pair["models"][role]
            assert m["model"] == model
            assert m["peak_memory_mb"] is None  # the CPU has no allocator statistics: null, never a guess
            if name == "latency_deit_s":
                assert 0 < m["p50_ms"] <= m["p95_ms"] and m["samples"] == 2 * 3
            else:
                assert len(m["step_s_rounds"]) == 2 and m["img_per_s"] > 0
                assert m["step_s"] == pytest.approx(statistics.median(m["step_s_rounds"]), abs=2e-6)
    assert pairs["swin_s"]["models"]["base"]["model_kwargs"]["fused_attn"] is True
    for name in ("deit_s_compile", "deit_s_graphs", "deit_t_graphs", "train_deit_s_compile", "train_deit_s_graphs",
                 "latency_deit_s"):
        assert pairs[name]["compile"] == {"backend": "eager", "mode": None}  # --quick traces only
    # the patch GEMM is an opt-in speed step: the fairness pair gives it to both models, the others to neither
    for role in ("stvit", "base"):
        assert pairs["deit_s_same_embed"]["models"][role]["model_kwargs"]["patch_gemm"] is True
        assert "patch_gemm" not in pairs["deit_s"]["models"][role]["model_kwargs"]
    assert "compile" not in pairs["deit_s"]
    assert pairs["train_deit_s"]["batch_size"] == 2 and pairs["latency_deit_s"]["batch_size"] == 1
    assert "profile" not in pairs["deit_s"]  # tables go to the profile file, not the JSON

    table = (out / f"{stem}.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| pair")]
    assert len(rows) == len(PAIRS)
    for name, row in zip(PAIRS, rows):
        assert row.startswith(f"| {LABELS[name]} |")
        if name in measured:
            assert f"{pairs[name]['speedup']:.2f}x" in row
            assert ("met" in row or "missed" in row) if TARGETS[name] else "| n/a |" in row
    assert "**failed**" in rows[PAIRS.index("deit_t")] and "injected failure" in rows[PAIRS.index("deit_t")]
    assert "skipped" in rows[PAIRS.index("onnx_deit_s")]
    profile = (out / f"{stem}_profile.md").read_text()
    for name in measured:
        assert f"## {name}: stvit" in profile and f"## {name}: base" in profile
    assert "Self CPU" in profile
    for name in ("deit_t", "deit_b", "onnx_deit_s"):  # printed progress names every pair's outcome
        assert name in proc.stdout


@pytest.mark.slow
def test_skip_compile_and_time_budget_skip_pairs_and_still_write_the_results(tmp_path):
    out = tmp_path / "results"
    proc = run_suite("--device", "cpu", "--quick", "--only", "deit_s_compile,deit_t", "--skip-compile",
                     "--time-budget", "0.001", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    stem = "gpu_cpu_" + re.search(r"gpu_cpu_(\S+?)\.json", proc.stdout).group(1)
    assert stem.endswith("_only-deit_s_compile-deit_t")
    report = json.loads((out / f"{stem}.json").read_text())
    assert list(report["pairs"]) == ["deit_s_compile", "deit_t"]
    assert report["pairs"]["deit_s_compile"]["status"] == "skipped"
    assert report["pairs"]["deit_s_compile"]["reason"] == "--skip-compile"
    assert report["pairs"]["deit_t"]["status"] == "skipped"
    assert "time budget spent" in report["pairs"]["deit_t"]["reason"]
    rows = [line for line in (out / f"{stem}.md").read_text().splitlines() if line.startswith("| STViT")]
    assert len(rows) == 2 and all("skipped" in row for row in rows)


def test_unknown_pair_is_one_error_line_and_writes_nothing(tmp_path):
    out = tmp_path / "results"
    proc = run_suite("--device", "cpu", "--quick", "--only", "deit_s,deit_xl", "--output-dir", str(out), timeout=60)
    assert_one_error_line(proc, "--only", "'deit_xl'", "deit_s_compile")
    assert not out.exists()


@pytest.mark.parametrize("args, fragments", [
    (["--device", "cpu", "--dtype", "bf16"], ["--dtype bf16", "cuda"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--device", "cpu", "--batch-size", "0"], ["--batch-size", "at least 1"]),
    (["--device", "cpu", "--time-budget", "-5"], ["--time-budget", "positive"]),
])
def test_bad_options_are_one_error_line(tmp_path, args, fragments):
    proc = run_suite(*args, "--output-dir", str(tmp_path / "r"), timeout=60)
    assert_one_error_line(proc, *fragments)
    assert not (tmp_path / "r").exists()


def test_unwritable_output_dir_is_one_error_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = run_suite("--device", "cpu", "--quick", "--output-dir", str(blocker / "results"), timeout=60)
    assert_one_error_line(proc, "--output-dir", "cannot write")


def test_inductor_modes_of_the_compiled_pairs(monkeypatch):
    """Which pairs replay CUDA graphs with inductor (on the CPU --quick uses the eager backend, which has no mode)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SCRIPT)
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, suite)  # dataclasses look their module up there
    spec.loader.exec_module(suite)
    settings = suite.settings_from_args(suite.parse_args(["--device", "cpu"]))
    assert settings.compile_backend == "inductor"
    modes = {p.name: suite._compile_mode(p, settings) for p in suite.PAIRS}
    graphs = {"deit_s_graphs", "deit_t_graphs", "train_deit_s_graphs", "latency_deit_s"}
    assert {name for name, mode in modes.items() if mode == "reduce-overhead"} == graphs
    assert modes["deit_s_compile"] is None and modes["train_deit_s_compile"] is None and modes["deit_s"] is None
    quick = suite.settings_from_args(suite.parse_args(["--device", "cpu", "--quick"]))
    assert all(suite._compile_mode(p, quick) is None for p in suite.PAIRS)


@pytest.mark.slow
def test_training_pairs_run_only_when_asked_and_report_epochs_and_accuracy(tmp_path):
    """The training pairs (--training, or by name): an epoch of fine-tuning over JPEG files generated by the
    suite, beside the same step fed from memory; and the accuracy parity runs, several seeds per model."""
    out = tmp_path / "results"
    proc = run_suite("--device", "cpu", "--quick", "--only", "finetune_deit_s,parity_fmnist", "--output-dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(next(out.glob("*.json")).read_text())
    finetune, parity = report["pairs"]["finetune_deit_s"], report["pairs"]["parity_fmnist"]
    assert finetune["status"] == "ok" and finetune["images"] == 24 and finetune["workers"] == 0
    for role in ("stvit", "base"):
        m = finetune["models"][role]
        assert m["img_per_s"] > 0 and m["from_memory_img_per_s"] > 0 and m["epoch_s"] > 0
        assert m["loader_share"] == pytest.approx(1 - m["img_per_s"] / m["from_memory_img_per_s"], abs=2e-3)
    assert finetune["met"] == (finetune["speedup"] >= 1.8) and finetune["from_memory_speedup"] > 0
    assert parity["status"] == "ok" and parity["seeds"] == 2 and parity["train_images"] == 40
    for role in ("stvit", "base"):
        m = parity["models"][role]
        assert len(m["top1_seeds"]) == 2 and m["top1_mean"] == pytest.approx(statistics.fmean(m["top1_seeds"]), abs=0.01)
    assert parity["models"]["stvit"]["model_kwargs"]["num_semantic_tokens"] == 16
    assert parity["top1_gap"] == pytest.approx(parity["models"]["stvit"]["top1_mean"]
                                               - parity["models"]["base"]["top1_mean"], abs=0.01)
    assert parity["met"] == (parity["top1_gap"] >= -0.5)
    table = next(out.glob("*.md")).read_text()
    assert "| accuracy |" in table and "points |" in table and "(from memory " in table


def test_training_pairs_are_not_in_the_default_run_and_need_their_data(monkeypatch, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_suite_under_test", SCRIPT)
    suite = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, suite)
    spec.loader.exec_module(suite)
    default = suite.parse_args(["--device", "cpu"])
    assert [p.name for p in suite.plan(default, suite.settings_from_args(default))] == PAIRS
    training = suite.parse_args(["--device", "cpu", "--training"])
    assert [p.name for p in suite.plan(training, suite.settings_from_args(training))] == \
        PAIRS + ["finetune_deit_s", "parity_fmnist"]
    settings = suite.settings_from_args(suite.parse_args(["--device", "cpu", "--fashion-mnist", str(tmp_path)]))
    assert "apt-get install dataset-fashion-mnist" in suite._parity_skip_reason(settings)
