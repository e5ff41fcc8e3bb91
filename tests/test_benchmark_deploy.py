"""``stvit benchmark --runtime onnxruntime`` and ``--batch-sizes`` (throughput and p50/p95 latency per batch size,
table, ``--json``, ``--plot``). Tiny settings: the schema and the files are tested, never the timings. Bad inputs
(onnxruntime or matplotlib missing, options that exclude each other...) are in test_cli_contract.py."""

from __future__ import annotations

import json

import pytest

from .train_utils import cli_in_process

SWEEP = ["benchmark", "deit_tiny", "--tokens", "16", "--rounds", "2", "--round-time", "0.01", "--device", "cpu"]


def _run_ok(args):
    result = cli_in_process(args)
    assert result.returncode == 0, result.stderr
    return result


def _check_sweep(results, batch_sizes, runtime):
    assert [r["batch_size"] for r in results] == batch_sizes
    for r in results:
        assert r["runtime"] == runtime and r["bench"] == "inference" and r["model"].startswith("deit_tiny")
        assert r["stvit_model"] == "stvit_deit_tiny_patch16_224" and r["tokens"] == 16
        for key in ("base", "stvit"):
            latency = r[key]["latency_ms"]
            assert 0 < latency["p50"] <= latency["p95"] and latency["steps"] >= 2  # at least one step per round
            assert r[key]["img_per_sec"] > 0 and r[key]["gflops"] > 0
        assert r["latency_speedup_p50"] == pytest.approx(r["base"]["latency_ms"]["p50"] / r["stvit"]["latency_ms"]["p50"],
                                                         rel=1e-2)
        assert r["speedup"] == pytest.approx(r["stvit"]["img_per_sec"] / r["base"]["img_per_sec"], rel=1e-2)


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    from PIL import Image

    with Image.open(path) as image:
        assert image.size[0] > image.size[1] > 200  # two panels side by side
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no temporary left


@pytest.mark.slow
def test_batch_sizes_table_json_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    text = _run_ok([*SWEEP, "--batch-sizes", "1,2", "--plot", str(tmp_path / "sweep.png")]).stdout
    lines = text.splitlines()
    assert "p50 ms" in lines[2] and "p95 ms" in lines[2]
    assert "throughput speedup" in lines[2] and "p50 latency speedup" in lines[2]  # which speedup is which
    assert [ln.split("|")[0].strip() for ln in lines[3:5]] == ["1", "2"]
    assert lines[5:] == [f"plot written to {tmp_path / 'sweep.png'}"]
    _assert_png(tmp_path / "sweep.png")

    results = json.loads(_run_ok([*SWEEP, "--batch-sizes", "2,1", "--json"]).stdout)
    _check_sweep(results, [2, 1], "torch")


@pytest.mark.slow
def test_onnxruntime_runtime_with_batch_sizes_and_plot(tmp_path):
    """Both models exported to ONNX once (dynamic batch) and run by onnxruntime at each batch size."""
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("matplotlib")
    out = tmp_path / "plot"
    out.mkdir()
    results = json.loads(_run_ok([*SWEEP, "--runtime", "onnxruntime", "--batch-sizes", "1,3",
                                  "--plot", str(out / "ort.png"), "--json"]).stdout)
    _check_sweep(results, [1, 3], "onnxruntime")
    assert all(r["onnxruntime"] == onnxruntime.__version__ for r in results)
    assert results[0]["device"] == "cpu" and results[0]["dtype"] == "float32"
    _assert_png(out / "ort.png")
