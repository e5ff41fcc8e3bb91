"""The scripts of benchmarks/ that a user or maintainer reruns, in-process on small settings: they run, and the
tables they print are the ones in the docs. benchmarks/gpu_suite.py has its own file (test_gpu_suite.py); the
Swin backbone speed is tested in test_swin.py."""

from __future__ import annotations

import contextlib
import importlib.util
import io
from types import ModuleType

import pytest

from .conftest import REPO_ROOT


def load_script(name: str) -> ModuleType:
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def doc_rows(page: str, first_cell: str) -> list:
    return [line for line in (REPO_ROOT / "docs" / page).read_text().splitlines()
            if line.startswith(f"| {first_cell} |")]


def test_flops_deit_prints_the_docs_table_row():
    flops = load_script("flops")
    out = _run(flops, ["deit", "--sizes", "tiny"])
    row = next(line for line in out if line.startswith("| DeiT-T |"))
    assert row in doc_rows("benchmarks.md", "DeiT-T")


@pytest.mark.slow
def test_flops_swin_prints_the_docs_table_rows():
    flops = load_script("flops")
    out = _run(flops, ["swin", "--sizes", "tiny"])
    rows = [line for line in out if line.startswith("| Swin-T |")]
    assert [r.split(" | ")[2] for r in rows] == ["patch", "conv"]
    assert rows == [line.replace("**", "") for line in doc_rows("benchmarks-swin.md", "Swin-T")]  # bold: the release


@pytest.mark.slow
def test_flops_detection_prints_the_backbone_totals():
    flops = load_script("flops")
    out = "\n".join(_run(flops, ["detection", "--size", "800", "1333"]))
    assert "| Swin-S (timm) | 193.8 | 194 |" in out
    assert "| STViT-R-Swin-S, detection layout | 133.0 (-31%) | 134 |" in out
    assert "Swin-S layouts at 224 px (backbone GMACs): (a) 8.74, (b) 5.62, (c) 5.89, (d) 10.35" in out


def test_flops_needs_a_table(capsys):
    flops = load_script("flops")
    with pytest.raises(SystemExit) as exc:
        flops.main([])
    assert exc.value.code == 2 and "deit" in capsys.readouterr().err


def _run(module: ModuleType, argv: list) -> list:
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        module.main(argv)
    return buffer.getvalue().splitlines()


@pytest.mark.slow
def test_fashion_mnist_recipe_runs_all_four_runs_on_a_tiny_folder(tmp_path):
    """benchmarks/fashion_mnist_recipe.py end to end (a real process: it forks its runs) on 7 training and 3
    validation images per class, one epoch at width 8: four curves, the summary and the table."""
    import json
    import shutil
    import subprocess
    import sys

    from stvit_core.data import embedded_dataset_path

    from .conftest import cli_env

    data = tmp_path / "tiny"
    for split, count in (("train", 7), ("val", 3)):
        for class_dir in sorted((embedded_dataset_path() / split).iterdir()):
            (data / split / class_dir.name).mkdir(parents=True)
            for image in sorted(class_dir.iterdir())[:count]:
                shutil.copy(image, data / split / class_dir.name / image.name)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "fashion_mnist_recipe.py"), "--data",
                           str(data), "--output", str(out), "--epochs", "1", "--width", "8", "--heads", "1",
                           "--batch-size", "16", "--workers", "0", "--threads", "1"],
                          capture_output=True, text=True, env=cli_env(), cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert list(summary["runs"]) == ["deit_scratch", "stvit_scratch", "stvit_converted_ft",
                                     "stvit_converted_ft_distill"]
    assert all(len(run["top1_per_epoch"]) == 1 for run in summary["runs"].values())
    assert 0 <= summary["top1_right_after_conversion"] <= 100
    assert (out / "curves.csv").read_text().count("\n") == 5
    assert proc.stdout.count("| stvit_") == 3
