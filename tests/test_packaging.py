"""The package as users get it from PyPI: `python -m build` makes a wheel that installs into a fresh virtual
environment, whose `stvit` console script runs `--help` and `benchmark`."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO_ROOT


@pytest.mark.slow
def test_wheel_builds_installs_and_runs(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO_ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    wheels = list(dist.glob("stvit-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "stvit_core/templates/model_card.md" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    metadata = zipfile.ZipFile(wheels[0]).read(next(n for n in names if n.endswith("METADATA"))).decode()
    for requirement in ("torch", "timm", "click", "huggingface-hub", "safetensors", "tqdm", "jinja2"):
        assert f"Requires-Dist: {requirement}" in metadata

    # A fresh environment. Its dependencies (torch, timm, ... several GB) are borrowed from this one through a
    # .pth file instead of being downloaded again; the wheel itself installs with --no-deps.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # Outside the checkout and without PYTHONPATH, so that no development copy of stvit is visible to pip.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "--quiet",
                    str(wheels[0])], check=True, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    stvit = env_dir / "bin" / "stvit"
    located = subprocess.run([str(py), "-c", "import stvit_core; print(stvit_core.__file__)"], env=env, cwd=tmp_path,
                             check=True, capture_output=True, text=True).stdout
    assert str(env_dir) in located, "the wheel's copy must be the one imported"
    help_text = subprocess.run([str(stvit), "--help"], env=env, cwd=tmp_path, check=True, capture_output=True,
                               text=True).stdout
    assert "convert" in help_text and "benchmark" in help_text
    bench = subprocess.run([str(stvit), "benchmark", "deit_tiny", "--batch-size", "1", "--rounds", "1",
                            "--round-time", "0.01", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=600)
    assert bench.returncode == 0, bench.stderr
    assert '"speedup"' in bench.stdout
