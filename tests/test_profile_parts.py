"""benchmarks/profile_parts.py (docs/benchmarks.md's per-part timings) runs as a real process, every part
timed in the same alternating rounds."""

from __future__ import annotations

import re
import subprocess
import sys

from .conftest import REPO_ROOT, cli_env

SCRIPT = REPO_ROOT / "benchmarks" / "profile_parts.py"


def test_times_every_part_of_both_models_in_alternating_rounds():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--model", "deit_tiny", "--tokens", "16", "--batch-size", "1",
                           "--reps", "3"], capture_output=True, text=True, env=cli_env(), cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^batch 1, 1 threads, torch .*, 3 alternating rounds \(medians\)$", proc.stdout, re.M)
    ms = {f"{model} {name}": float(t)
          for model, name, t in re.findall(r"^  (stvit|base) +(.+?) +([\d.]+) ms", proc.stdout, re.M)}
    parts = ["stvit embed", "stvit image blocks (x4)", "stvit generator", "stvit semantic blocks (x6)",
             "stvit norm + head"]
    assert list(ms) == [*parts, "stvit sum of the parts", "stvit total", "base first 4 blocks",
                        "base last 8 blocks", "base total"], proc.stdout
    assert all(t > 0 for t in ms.values())
    assert abs(ms["stvit sum of the parts"] - sum(ms[p] for p in parts)) <= 0.05 * (len(parts) + 1) + 1e-9
    speedup = float(re.search(r"^  speedup ([\d.]+)x$", proc.stdout, re.M).group(1))
    assert abs(speedup - ms["base total"] / ms["stvit total"]) < 0.01 + 0.02 * speedup


def test_parts_take_turns_within_every_round(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "benchmarks"))
    from profile_parts import alternating_medians

    order = []
    medians = alternating_medians({name: (lambda n=name: order.append(n)) for name in "abc"}, rounds=3)
    assert order == list("abc") * 4  # one warm-up call each, then a, b, c in every round
    assert set(medians) == set("abc") and all(t >= 0 for t in medians.values())
