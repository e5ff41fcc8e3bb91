"""benchmarks/small_gemm.py (the evidence for docs/benchmarks.md's batch-1 analysis) runs as a real process."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import REPO_ROOT, cli_env

SCRIPT = REPO_ROOT / "benchmarks" / "small_gemm.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=cli_env(),
                          cwd=REPO_ROOT, timeout=120)


def test_times_every_block_shape_at_each_row_count():
    proc = run("--threads", "1", "--rows", "3,5", "--reps", "2", "--rounds", "1", "--read-mb", "1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"1 thread\(s\); plain read bandwidth [\d.]+ GB/s", proc.stdout)
    rows = re.findall(r"rows +(\d+) +(\d+) -> +(\d+): +[\d.]+ us +[\d.]+ GMAC/s +weights read at +[\d.]+ GB/s",
                      proc.stdout)
    assert rows == [(m, k, n) for m in ("3", "5") for k, n in (("384", "1152"), ("384", "1536"), ("1536", "384"))]


def test_bad_options_are_one_error_line():
    for args in (["--threads", "0"], ["--rows", "17,x"], ["--rows", "0"]):
        proc = run(*args)
        assert proc.returncode != 0 and proc.stdout == ""
        assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("Error: "), proc.stderr
