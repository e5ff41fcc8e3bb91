"""``stvit export`` and ``stvit predict``: ONNX and .pt2 files, dynamic and fixed batch, feature maps, the metadata
a serving stack reads, the check of the written file against PyTorch; predictions of a model fine-tuned on the
embedded Fashion-MNIST subset from its directory and from its .onnx; every code block of docs/deploy.md.

Each export test exports a tiny real model (28 px, width 48) once and then runs the file independently of the
command's own check (onnxruntime / ``torch.export.load`` at a batch size the check did not use). Bad inputs
(unknown format, an existing or unwritable output, a model that is not STViT...) are in test_cli_contract.py;
onnxruntime missing is also tested here in a real process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from stvit_core import __version__, load_model, save_model
from stvit_core.data import embedded_dataset_path, folder_classes, model_data_config

from .conftest import run_cli
from .train_utils import ROOT, TINY, cli_in_process, env

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

LABELS = folder_classes(embedded_dataset_path() / "train")


@pytest.fixture(scope="module")
def stvit_dir(tmp_path_factory):
    """A tiny STViT-DeiT with class names, saved as `stvit finetune` saves its best model."""
    torch.manual_seed(0)
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY, num_semantic_tokens=4, num_image_blocks=2)
    model.pretrained_cfg = {**model.pretrained_cfg, "num_classes": 10, "label_names": LABELS, "crop_pct": 0.9}
    return save_model(model, tmp_path_factory.mktemp("models") / "stvit")


@pytest.fixture(scope="module")
def recovery_dir(tmp_path_factory):
    """A tiny STViT-R-DeiT (one dumbbell unit): it has full-resolution feature maps."""
    torch.manual_seed(0)
    model = timm.create_model("stvit_r_deit_tiny_patch16_224", **TINY, num_semantic_tokens=4)
    return save_model(model, tmp_path_factory.mktemp("models") / "stvit-r")


def _run_ok(args):
    result = cli_in_process(args)
    assert result.returncode == 0, result.stderr
    return result


def _diff(a, b) -> float:
    return float((torch.as_tensor(a) - b).abs().max())


def _random(batch: int, size=(3, 28, 28)) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(batch))


@pytest.mark.slow
def test_onnx_dynamic_batch_carries_preprocessing_and_class_names(stvit_dir, tmp_path):
    out = tmp_path / "m.onnx"
    r = json.loads(_run_ok(["export", str(stvit_dir), "--dynamic-batch", "-o", str(out), "--json"]).stdout)

    assert r["format"] == "onnx" and r["dynamic_batch"] and r["batch_size"] is None and r["outputs"] == ["logits"]
    assert [c["batch_size"] for c in r["checks"]] == [1, 3]
    assert all(0 <= c["max_abs_diff"] <= 1e-4 for c in r["checks"])
    assert r["max_abs_diff"] == max(c["max_abs_diff"] for c in r["checks"]) and r["tolerance"] == 1e-4
    assert r["opset"] >= 18 and "onnxruntime" in r["checked_with"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary file left

    model = load_model(stvit_dir).eval()
    config = model_data_config(model)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(meta["mean"]) == list(config["mean"]) and json.loads(meta["std"]) == list(config["std"])
    assert json.loads(meta["input_size"]) == [3, 28, 28] and float(meta["crop_pct"]) == 0.9
    assert meta["interpolation"] == config["interpolation"] and meta["crop_mode"] == "center"
    assert json.loads(meta["label_names"]) == LABELS and meta["output"] == "logits"
    assert meta["model_name"] == "stvit_deit_tiny_patch16_224" and meta["stvit_version"] == __version__

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (feed,) = session.get_inputs()
    assert feed.name == "image" and not isinstance(feed.shape[0], int), feed.shape  # the batch stays symbolic
    x = _random(5)
    with torch.no_grad():
        assert _diff(session.run(None, {"image": x.numpy()})[0], model(x)) <= 1e-4


@pytest.mark.slow
def test_onnx_fixed_batch_feature_maps(recovery_dir, tmp_path):
    out = tmp_path / "features.onnx"
    r = json.loads(_run_ok(["export", str(recovery_dir), "--features", "-b", "2", "-o", str(out), "--json"]).stdout)
    features = load_model(recovery_dir, features_only=True).eval()
    x = _random(2)
    with torch.no_grad():
        expected = features(x)
    assert len(expected) == len(features.feature_info.out_indices)
    assert r["outputs"] == [f"features_{i}" for i in range(len(expected))]
    assert not r["dynamic_batch"] and r["batch_size"] == 2 and [c["batch_size"] for c in r["checks"]] == [2]

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 28, 28]
    got = session.run(None, {"image": x.numpy()})
    assert [g.shape for g in got] == [tuple(e.shape) for e in expected]
    assert max(_diff(g, e) for g, e in zip(got, expected)) <= 1e-4
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["output"] == "features" and "label_names" not in meta and json.loads(meta["input_size"]) == [3, 28, 28]


@pytest.mark.slow
def test_pt2_dynamic_batch(stvit_dir, tmp_path):
    model = load_model(stvit_dir).eval()
    text = _run_ok(["export", str(stvit_dir), "--format", "pt2", "-o", str(tmp_path / "m.pt2")]).stdout
    assert f"-> {tmp_path / 'm.pt2'} (torch.export (.pt2), dynamic batch" in text
    assert "max abs diff" in text and "at batch 1" in text and "at batch 3" in text and "torch.export.load" in text
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    x = _random(4)
    with torch.no_grad():
        assert _diff(program(x), model(x)) <= 1e-4


@pytest.mark.slow
def test_pt2_fixed_batch_of_a_source_name_converted_on_the_fly(tmp_path):
    r = json.loads(_run_ok(["export", "deit_tiny", "--tokens", "4", "--no-pretrained", "--format", "pt2", "-b", "2",
                            "-o", str(tmp_path / "t.pt2"), "--json"]).stdout)
    assert r["model"] == "stvit_deit_tiny_patch16_224" and r["tokens"] == 4 and r["input_size"] == [3, 224, 224]
    assert not r["dynamic_batch"] and [c["batch_size"] for c in r["checks"]] == [2] and r["max_abs_diff"] <= 1e-4
    fixed = torch.export.load(str(tmp_path / "t.pt2")).module()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        assert fixed(x[:2]).shape == (2, 1000)
        with pytest.raises(Exception):  # the batch is fixed at 2: torch.export's guards refuse another
            fixed(x)


@pytest.mark.slow
def test_a_failed_check_writes_nothing(stvit_dir, tmp_path):
    """The check is real: at a tolerance no float32 export meets, the export fails and leaves nothing."""
    from stvit_core.export import ExportCheckError, export_model

    with pytest.raises(ExportCheckError, match=r"differs from PyTorch by .* at batch 1 \(tolerance 1e-12\)"):
        export_model(load_model(stvit_dir), tmp_path / "m.onnx", batch_size=1, tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_read_onnx_metadata_gives_the_models_data_config(stvit_dir, tmp_path):
    """What a serving stack reads back is the model's own preprocessing (no export needed to test the round trip:
    the metadata is written into a minimal ONNX file)."""
    from onnx import TensorProto, helper

    from stvit_core.export import onnx_metadata
    from stvit_core.onnx_runtime import onnx_data_config, read_onnx_metadata

    model = load_model(stvit_dir)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(proto, onnx_metadata(model))
    onnx.save(proto, str(tmp_path / "m.onnx"))
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["label_names"] == LABELS
    config = model_data_config(model)
    assert onnx_data_config(meta) == {k: config[k] for k in onnx_data_config(meta)}


# --- stvit predict: a model fine-tuned on the embedded Fashion-MNIST subset, from its directory and its .onnx -----

HELD_OUT_PER_CLASS = 5  # 10 classes x 5 = 50 images the fine-tune never saw (neither trained on nor selected by)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A tiny STViT-DeiT (16 tokens) trained for 8 epochs on the 2000 training images (34/50 held-out images right
    with these settings; 4 epochs at lr 3e-3 gave 25-32, too close to the "most of them" line), and 50 held-out
    images."""
    import shutil

    from stvit_core.train import resolve_config, train

    from .train_utils import make_subset, tiny_stvit

    root = tmp_path_factory.mktemp("fm")
    data = make_subset(root / "data", 200, 5)
    held_out = root / "held-out"
    source = embedded_dataset_path() / "val"
    for name in LABELS:  # the val images after the 5 per class the run selects its best epoch on
        (held_out / name).mkdir(parents=True)
        for f in sorted((source / name).iterdir())[5:5 + HELD_OUT_PER_CLASS]:
            shutil.copyfile(f, held_out / name / f.name)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = resolve_config(overrides=dict(data=str(data), output=str(root / "run"), epochs=8, batch_size=32,
                                            workers=0, lr=2e-3, warmup_epochs=0.5, scale_min=0.5, drop_path=0.0,
                                            smoothing=0.0, quiet=True))
        train(cfg, tiny_stvit(tokens=16))
    finally:
        torch.set_num_threads(threads)
    return {"model": root / "run" / "best", "images": held_out}


@pytest.fixture(scope="module")
def deployed(finetuned, tmp_path_factory):
    """Every code block of docs/deploy.md run in order on the fine-tuned model (as ``runs/fm/best``, the kind of
    model docs/training.md fine-tunes; tests/test_train.py runs that page): ``stvit`` commands in process, the
    Python blocks in one shared session (the serving block defines what the next one checks). Its ``fm.onnx``
    is the exported file the predict tests use."""
    import shlex
    import shutil

    from .train_utils import doc_blocks

    work = tmp_path_factory.mktemp("deploy")
    shutil.copytree(finetuned["model"], work / "runs" / "fm" / "best")
    session: dict = {"__name__": "__doc__"}
    blocks = doc_blocks(ROOT / "docs" / "deploy.md")
    outputs = []
    cwd = os.getcwd()
    os.chdir(work)
    try:
        for language, text in blocks:
            if language == "python":
                exec(compile(text, "deploy.md (python block)", "exec"), session)
                continue
            for command in text.replace("\\\n", " ").strip().splitlines():
                words = shlex.split(command, comments=True)
                assert words[:1] == ["stvit"], command
                result = cli_in_process(words[1:])
                assert result.returncode == 0, f"{command}\n{result.stderr}"
                outputs.append(result.stdout)
    finally:
        os.chdir(cwd)
    return {"languages": [language for language, _ in blocks], "outputs": outputs, "onnx": work / "fm.onnx",
            "model": finetuned["model"], "images": finetuned["images"]}


@pytest.mark.slow
def test_deploy_docs_run(deployed):
    assert deployed["languages"] == ["bash", "python", "python", "python", "bash"]
    assert deployed["onnx"].is_file() and "checked with onnxruntime" in deployed["outputs"][0]
    assert len(json.loads(deployed["outputs"][-1])["predictions"]) == 50  # stvit predict fm.onnx coats/ --json


def _top1(stdout: str) -> dict:
    return {p["image"]: p["top_k"][0]["label"] for p in json.loads(stdout)["predictions"]}


@pytest.mark.slow
def test_predict_is_right_for_most_held_out_images_and_the_onnx_file_agrees(deployed):
    from_dir = _run_ok(["predict", str(deployed["model"]), str(deployed["images"]), "--json"])
    from_onnx = _run_ok(["predict", str(deployed["onnx"]), str(deployed["images"]), "--json", "-k", "3"])
    torch_top1, onnx_top1 = _top1(from_dir.stdout), _top1(from_onnx.stdout)
    assert len(torch_top1) == 10 * HELD_OUT_PER_CLASS
    assert onnx_top1 == torch_top1  # the same top-1 class for every image
    right = sum(Path(image).parent.name == label for image, label in torch_top1.items())
    assert right > 25, f"{right}/50 right (chance: 5)"  # most of them
    r = json.loads(from_onnx.stdout)
    assert r["runtime"] == "onnxruntime" and r["top_k"] == 3 and r["errors"] == []
    assert all(len(p["top_k"]) == 3 and 0 <= p["top_k"][0]["probability"] <= 1 for p in r["predictions"])
    assert all(p["top_k"][0]["probability"] >= p["top_k"][1]["probability"] for p in r["predictions"])
    assert json.loads(from_dir.stdout)["runtime"] == "torch"


@pytest.mark.slow
def test_predict_text_output_and_an_unreadable_image(deployed, tmp_path):
    images = sorted((deployed["images"] / "coat").iterdir())[:2]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    for model in (deployed["model"], deployed["onnx"]):
        result = cli_in_process(["predict", str(model), str(images[0]), str(bad), str(images[1]), "-k", "2"])
        assert result.returncode == 1
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("Error: cannot read image") and "broken.png" in lines[0]
        out = result.stdout.splitlines()  # the other images are still classified
        assert [ln.split(": ")[0] for ln in out] == [str(images[0]), str(images[1])]
        assert all(len(ln.split(": ")[1].split(", ")) == 2 for ln in out), out


@pytest.mark.slow
def test_without_onnxruntime_export_and_predict_say_which_extra_and_write_nothing(stvit_dir, tmp_path):
    """A real process where ``import onnxruntime`` fails (a shim package first on PYTHONPATH), as in an install
    without ``stvit[export]``."""
    shim = tmp_path / "shim" / "onnxruntime"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    environment = dict(env(), PYTHONPATH=f"{shim.parent}{os.pathsep}{ROOT}")
    image = next(iter(sorted((embedded_dataset_path() / "val" / "coat").iterdir())))
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "any.onnx").write_bytes(b"not read: onnxruntime is missing")
    for args in (["export", str(stvit_dir), "-o", str(out / "m.onnx")],
                 ["predict", str(tmp_path / "any.onnx"), str(image)]):
        result = subprocess.run([sys.executable, "-m", "stvit_cli", *args], capture_output=True, text=True,
                                env=environment, cwd=tmp_path, timeout=300)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert len(lines) == 1 and lines[0].startswith("Error: ") and "onnxruntime" in lines[0], result.stderr
        assert "pip install 'stvit[export]'" in lines[0]
        assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["any.onnx", "out", "shim"]


@pytest.mark.slow
@pytest.mark.parametrize("opset", [1, 999])
def test_an_opset_the_exporter_cannot_write_is_one_line_and_no_file(stvit_dir, tmp_path, opset):
    """torch's exporter builds opset 18 and converts; a failed conversion used to log a traceback and write
    opset 18 anyway (1), or fail in onnxruntime naming a temporary file (999)."""
    result = _stvit(["export", str(stvit_dir), "-o", "m.onnx", "--opset", str(opset)], tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write ONNX opset {opset}"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_broken_symlink_in_an_image_folder_is_reported_not_skipped(tmp_path):
    from stvit_core.errors import DataError
    from stvit_core.images import find_images, read_image

    image = next(iter(sorted((embedded_dataset_path() / "val" / "coat").iterdir())))
    (tmp_path / "a.png").write_bytes(image.read_bytes())
    (tmp_path / "b.png").symlink_to(tmp_path / "gone.png")
    images, errors = find_images([tmp_path])
    assert [p.name for p in images] == ["a.png", "b.png"] and errors == []
    read_image(images[0])
    with pytest.raises(DataError, match="b.png"):
        read_image(images[1])


def _stvit(args, cwd):
    return run_cli(*args, env=env(), exact_env=True, cwd=cwd)


def _one_error_line(result, code=2) -> str:
    assert result.returncode == code and "Traceback" not in result.stderr, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and result.stdout == "", result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def batch1_onnx(stvit_dir, tmp_path_factory):
    """`stvit export --batch-size 1 --json`: the file (a fixed batch of 1) and what --json said."""
    out = tmp_path_factory.mktemp("b1") / "b1.onnx"
    result = _stvit(["export", str(stvit_dir), "-o", str(out), "--batch-size", "1", "--json"], out.parent)
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.mark.slow
def test_predict_a_batch_size_other_than_the_files_fixed_batch_is_a_usage_error(batch1_onnx, tmp_path):
    """It used to run at the file's batch of 1 unsaid; without -b the file's batch is still used."""
    onnx_file, _ = batch1_onnx
    images = [str(p) for p in sorted((embedded_dataset_path() / "val" / "coat").iterdir())[:3]]
    error = _one_error_line(_stvit(["predict", str(onnx_file), *images, "--device", "cpu", "-b", "2"], tmp_path))
    assert "--batch-size 2" in error and "fixed batch of 1" in error, error
    for args in ([], ["-b", "1"]):
        result = _stvit(["predict", str(onnx_file), *images, "--device", "cpu", "--json", *args], tmp_path)
        assert result.returncode == 0, result.stderr
        assert len(json.loads(result.stdout)["predictions"]) == 3


@pytest.mark.slow
def test_a_failed_opset_names_the_opset_a_default_export_writes(stvit_dir, batch1_onnx, tmp_path):
    """The message used to name the exporter's build opset (18), not what an export without --opset writes."""
    _, written = batch1_onnx
    error = _one_error_line(_stvit(["export", str(stvit_dir), "-o", "o99.onnx", "--opset", "99"], tmp_path))
    assert error.endswith(f"(without an opset it writes {written['opset']})"), (error, written["opset"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("output", ["newdir/", "existing/"])
def test_an_output_ending_in_a_separator_is_a_usage_error(stvit_dir, tmp_path, output):
    """`--output newdir/` used to write a file named newdir."""
    (tmp_path / "existing").mkdir()
    error = _one_error_line(_stvit(["export", str(stvit_dir), "--output", output], tmp_path))
    assert f"{output} ends in /, so it names a folder" in error, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"] and not any((tmp_path / "existing").iterdir())
