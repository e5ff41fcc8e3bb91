"""`stvit benchmark`: schema, same settings for both models, errors. Speed itself is measured by benchmarks,
never asserted in tests."""

from __future__ import annotations

import json

import pytest
import timm

import stvit_core  # noqa: F401
import stvit_core.benchmark as benchmark_module
from stvit_core.benchmark import BenchmarkSettings, benchmark_pair, model_label, speedup_spread, speedup_warning
from stvit_core.convert import convert_model

from .conftest import TINY_VIT, run_cli

QUICK = ["--batch-size", "2", "--rounds", "1", "--round-time", "0.01"]


def _pair():
    base = timm.create_model("deit_tiny_patch16_224", **TINY_VIT)
    return base, convert_model(base, num_semantic_tokens=4)


@pytest.mark.parametrize("bench", ["inference", "train"])
def test_benchmark_pair_schema(bench):
    base, stvit = _pair()
    result = benchmark_pair(base, stvit, BenchmarkSettings(batch_size=4, bench=bench, rounds=2, min_round_time=0.01))
    for key in ("base", "stvit"):
        assert result[key]["img_per_sec"] > 0
        assert result[key]["gflops"] > 0 and result[key]["params_m"] > 0
        assert result[key]["peak_memory_mb"] is None  # CPU: CUDA-only measurement
    assert result["speedup"] == pytest.approx(result["stvit"]["img_per_sec"] / result["base"]["img_per_sec"], rel=1e-2)
    assert result["flops_ratio"] > 1
    assert result["bench"] == bench and result["batch_size"] == 4


@pytest.mark.slow
def test_cli_json_schema_for_a_source_name():
    # a process of its own: a warning logged once per process (on importing torch.utils.cpp_extension) shows there
    proc = run_cli("benchmark", "deit_tiny", "--tokens", "16", *QUICK, "--json", check=True, fresh_process=True)
    r = json.loads(proc.stdout)
    # e.g. no "No CUDA runtime is found" from torch.utils.cpp_extension on a CUDA build; a busy machine may warn
    assert all(line.startswith("Warning: speedup") for line in proc.stderr.splitlines()), proc.stderr
    assert {"model", "tokens", "device", "dtype", "batch_size", "base", "stvit", "speedup", "flops_ratio"} <= set(r)
    assert r["model"] == "deit_tiny_patch16_224.fb_in1k" and r["tokens"] == 16
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["batch_size"] == 2
    assert set(r["base"]) >= {"params_m", "gflops", "img_per_sec"}
    assert r["flops_ratio"] == pytest.approx(1.26 / 0.53, rel=0.03)
    assert len(r["speedup_rounds"]) == 1 and set(r["speedup_spread"]) == {"min", "q1", "q3", "max"}
    assert r["labels"] == {"base": "deit_tiny_patch16_224", "stvit": "stvit_deit_tiny_patch16_224 (16 tokens)"}


@pytest.mark.slow
def test_cli_table_and_both_benchmarks(monkeypatch):
    monkeypatch.setattr(benchmark_module, "speedup_warning", lambda *args: "speedup 9.99x is unreliable: test")
    proc = run_cli("benchmark", "deit_tiny", *QUICK, "--bench", "both", check=True)
    assert "speedup" in proc.stdout and proc.stdout.count("img/s") == 2
    assert "inference" in proc.stdout and "train" in proc.stdout
    # the result's warning, one line each on stderr, naming which result it is about
    assert proc.stderr.splitlines() == [f"Warning: {bench}, batch 2: speedup 9.99x is unreliable: test"
                                        for bench in ("inference", "train")]


def test_cli_benchmark_of_a_saved_model(tmp_path):
    run_cli("convert", "deit_tiny", "--no-pretrained", "--tokens", "36", "--output", tmp_path / "m", check=True)
    r = json.loads(run_cli("benchmark", tmp_path / "m", *QUICK, "--json", check=True).stdout)
    assert r["tokens"] == 36 and r["model"].startswith("deit_tiny_patch16_224")
    # named by what it is, not by the pretrained source it was converted from
    assert r["labels"] == {"base": "deit_tiny_patch16_224", "stvit": "stvit_deit_tiny_patch16_224 (36 tokens)"}
    assert r["warnings"] == [] or r["warnings"][0].startswith("speedup")


@pytest.mark.slow
def test_cli_bfloat16_autocast_on_cpu():
    r = json.loads(run_cli("benchmark", "deit_tiny", *QUICK, "--dtype", "bfloat16", "--json", check=True).stdout)
    assert r["dtype"] == "bfloat16" and r["stvit"]["img_per_sec"] > 0


# Bad settings (--rounds 0, --device tpu, --cuda-graphs on CPU...) are in test_cli_contract.py.


def test_table_columns_stay_aligned_for_long_model_names():
    from stvit_cli.commands.benchmark import format_table

    row = {"params_m": 22.05, "gflops": 4.6, "img_per_sec": 1234.5, "peak_memory_mb": None}
    result = {"bench": "inference", "device": "cpu", "dtype": "float32", "batch_size": 2, "compile": False,
              "cuda_graphs": False, "torch": "x", "threads": 1, "model": "swin_base_patch4_window12_384.ms_in22k_ft_in1k",
              "stvit_model": "stvit_r_swin_base_patch4_window7_224", "tokens": None, "tokens_per_window": 16,
              "base": row, "stvit": dict(row, gflops=3.1), "speedup": 1.5, "flops_ratio": 1.48}
    header, base, stvit = format_table(result).splitlines()[1:4]
    assert len({len(header), len(base), len(stvit)}) == 1, (header, base, stvit)
    assert header.index("GFLOPs") + len("GFLOPs") == base.index("4.60") + len("4.60") == stvit.index("3.10") + 4


def test_timing_uses_the_process_thread_count():
    """torch.utils.benchmark.Timer defaults to one thread; the benchmark must time with the process's threads."""
    import torch

    from stvit_core.benchmark import _timer

    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _timer(lambda: None).timeit(1).task_spec.num_threads == 2
    finally:
        torch.set_num_threads(old)


def test_a_saved_model_is_timed_against_its_source_shaped_as_it_was(tmp_path):
    """A model built with another patch size and width (finetune --model-arg) gets a base of that shape, not
    the source's default architecture."""
    from stvit_core.benchmark import models_for_benchmark

    from .hub_fixtures import make_tiny_model

    saved = make_tiny_model(tmp_path / "m")  # deit_tiny's architecture with patch 8, width 48, 32 px
    base, stvit, source = models_for_benchmark(str(saved))
    assert source.startswith("deit_tiny_patch16_224")
    assert base.patch_embed.patch_size == stvit.patch_embed.patch_size == (8, 8)
    assert base.embed_dim == stvit.embed_dim == 48 and len(base.blocks) == 12
    assert base.patch_embed.img_size == (32, 32) and base.num_classes == stvit.num_classes == 10
    # its name says what it is: the architecture, its tokens, and the shape where it is not the name's
    assert model_label(base) == "deit_tiny_patch16_224 (32 px, patch 8, width 48)"
    assert model_label(stvit) == "stvit_deit_tiny_patch16_224 (4 tokens, 32 px, patch 8, width 48)"


@pytest.mark.parametrize("rounds, speedup, flops_ratio, says", [
    ([1.90, 1.95, 2.00], 1.95, 1.95, None),  # rounds agree, speedup as the FLOPs say
    ([1.00, 1.24], 1.12, 1.95, None),  # 1.24 apart: within the spread allowed
    ([1.9], 2.9, 1.95, None),  # one round has no spread; 1.49 times the FLOPs ratio is allowed
    ([1.5, 1.9, 2.0], 1.9, 1.95, ["rounds range from 1.50x to 2.00x"]),
    ([8.5, 8.71, 8.9], 8.71, 1.95, ["4.5 times the FLOPs ratio 1.95x"]),  # the reported case, steady rounds
    ([2.0, 8.71, 9.0], 8.71, 1.95, ["rounds range from 2.00x to 9.00x", "4.5 times the FLOPs ratio"]),
])
def test_speedup_warning_decides_on_the_rounds_and_the_flops_ratio(rounds, speedup, flops_ratio, says):
    warning = speedup_warning(rounds, speedup, flops_ratio)
    if says is None:
        assert warning is None
    else:
        assert warning.startswith(f"speedup {speedup:.2f}x is unreliable: ") and "\n" not in warning
        assert all(fragment in warning for fragment in says), warning


def test_speedup_spread_is_the_range_and_quartiles_of_the_rounds():
    assert speedup_spread([2.0]) == {"min": 2.0, "q1": 2.0, "q3": 2.0, "max": 2.0}
    assert speedup_spread([1.0, 4.0, 2.0, 3.0, 5.0]) == {"min": 1.0, "q1": 2.0, "q3": 4.0, "max": 5.0}


def test_table_shows_the_range_of_the_rounds():
    from stvit_cli.commands.benchmark import format_table

    row = {"params_m": 5.7, "gflops": 1.26, "img_per_sec": 100.0, "peak_memory_mb": None}
    result = {"bench": "inference", "device": "cpu", "dtype": "float32", "batch_size": 2, "compile": False,
              "cuda_graphs": False, "torch": "x", "threads": 1, "model": "deit_tiny_patch16_224.fb_in1k",
              "stvit_model": "stvit_deit_tiny_patch16_224", "tokens": 16, "tokens_per_window": None,
              "labels": {"base": "deit_tiny_patch16_224", "stvit": "stvit_deit_tiny_patch16_224 (16 tokens)"},
              "base": row, "stvit": dict(row, gflops=0.53, img_per_sec=871.0), "speedup": 8.71, "flops_ratio": 1.95,
              "speedup_rounds": [2.0, 8.71, 9.0], "speedup_spread": {"min": 2.0, "q1": 5.36, "q3": 8.86, "max": 9.0}}
    lines = format_table(result).splitlines()
    assert lines[2].startswith("deit_tiny_patch16_224 ") and lines[3].startswith("stvit_deit_tiny_patch16_224 (16 tokens)")
    assert lines[-1] == ("speedup 8.71x (median of 3 rounds: 2.00-9.00x, middle half 5.36-8.86x)   "
                         "(FLOPs ratio 1.95x)")
