"""Files that parse but are wrong: a model directory's config.json, an exported ONNX file's metadata, a training
checkpoint and a YAML config with a field of the wrong type or value each end in one line naming the file and
the field, where the file is read, never in a traceback later."""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import stvit_core
from stvit_core.checkpoint import read_config
from stvit_core.errors import CheckpointError

from .conftest import TINY_VIT, run_cli


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, num_semantic_tokens=4).eval()
    out = stvit_core.save_model(model, tmp_path_factory.mktemp("model") / "m",
                                metadata={"source_model": "deit_tiny_patch16_224"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["label_names"] = [f"class{i}" for i in range(10)]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "x.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(path)
    return path


def _tampered(saved_model, tmp_path, change):
    target = tmp_path / "tampered"
    shutil.copytree(saved_model, target)
    cfg = copy.deepcopy(json.loads((saved_model / "config.json").read_text()))
    change(cfg)
    (target / "config.json").write_text(json.dumps(cfg))
    return target


CONFIG_FAULTS = {
    "architecture": (lambda c: c.update(architecture=5), "architecture is 5"),
    "model_args": (lambda c: c.update(model_args=[]), "model_args is list"),
    "num_classes": (lambda c: c.update(num_classes="x"), "num_classes is 'x'"),
    "label_names short": (lambda c: c.update(label_names=["a", "b"]), "label_names has 2 names but the model has 10"),
    "label_names duplicate": (lambda c: c.update(label_names=["a"] * 10), "label_names names 'a' twice"),
    "label_names not names": (lambda c: c.update(label_names=list(range(10))), "label_names holds 0"),
    "mean": (lambda c: c["pretrained_cfg"].update(mean=[0.5, 0.5]), "pretrained_cfg.mean is [0.5, 0.5], not 3 numbers"),
    "std": (lambda c: c["pretrained_cfg"].update(std=[0.5, 0.0, 0.5]), "pretrained_cfg.std"),
    "input_size": (lambda c: c["pretrained_cfg"].update(input_size="big"), "pretrained_cfg.input_size is 'big'"),
    "input_size 2d": (lambda c: c["pretrained_cfg"].update(input_size=[32, 32]), "pretrained_cfg.input_size"),
    "crop_pct": (lambda c: c["pretrained_cfg"].update(crop_pct="x"), "pretrained_cfg.crop_pct is 'x'"),
    "crop_mode": (lambda c: c["pretrained_cfg"].update(crop_mode="zoom"), "pretrained_cfg.crop_mode is 'zoom'"),
    "interpolation": (lambda c: c["pretrained_cfg"].update(interpolation="foo"), "pretrained_cfg.interpolation"),
    "pretrained_cfg": (lambda c: c.update(pretrained_cfg=[]), "pretrained_cfg is list"),
    "stvit": (lambda c: c.update(stvit={"source_model": 5}), "stvit.source_model is 5"),
}


@pytest.mark.parametrize("fault", list(CONFIG_FAULTS))
def test_config_json_fields_are_checked_where_read(saved_model, tmp_path, fault):
    change, expected = CONFIG_FAULTS[fault]
    target = _tampered(saved_model, tmp_path, change)
    with pytest.raises(CheckpointError) as info:
        read_config(target)
    assert str(info.value).startswith(f"{target / 'config.json'}: ")
    assert expected in str(info.value)
    with pytest.raises(CheckpointError, match="config.json: "):
        stvit_core.load_model(target)


def test_untampered_config_reads(saved_model):
    assert read_config(saved_model)["label_names"][0] == "class0"
    assert stvit_core.load_model(saved_model).pretrained_cfg["label_names"][9] == "class9"


@pytest.mark.parametrize("command", ["predict", "eval", "benchmark", "export", "vis", "finetune"])
def test_every_command_reports_a_tampered_config_in_one_line(saved_model, tmp_path, image, command):
    target = _tampered(saved_model, tmp_path, lambda c: c.update(label_names=["a", "b"]))
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "a").mkdir(parents=True)
        shutil.copy(image, data / split / "a" / "x.png")
    args = {
        "predict": ["predict", target, image],
        "eval": ["eval", "folder", "-m", target, "-d", data, "--device", "cpu"],
        "benchmark": ["benchmark", target, "--device", "cpu"],
        "export": ["export", target, "-o", tmp_path / "m.pt2", "--format", "pt2"],
        "vis": ["vis", target, image, "-o", tmp_path / "vis"],
        "finetune": ["finetune", "-m", target, "-d", data, "-o", tmp_path / "run", "--device", "cpu"],
    }[command]
    result = run_cli(*args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (f"Error: {target / 'config.json'}: label_names has 2 names but the model has "
                                     "10 outputs"), result.stderr


# --- an exported ONNX file whose stvit metadata was edited ---------------------------------------------------

def _onnx_file(path, meta, outputs=10):
    """A minimal ONNX classifier (Identity over [1, outputs]) carrying ``meta`` as its metadata_props."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, outputs])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, outputs])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))
    return path


ONNX_META = {"model_name": "stvit_deit_tiny_patch16_224", "output": "logits", "input_size": "[3, 32, 32]",
             "mean": "[0.485, 0.456, 0.406]", "std": "[0.229, 0.224, 0.225]", "crop_pct": "0.875",
             "crop_mode": "center", "interpolation": "bicubic",
             "label_names": json.dumps([f"class{i}" for i in range(10)])}

ONNX_FAULTS = {
    "label_names short": ({"label_names": '["a", "b"]'}, "label_names has 2 names but the model has 10 outputs"),
    "label_names mapping": ({"label_names": '{"0": "a"}'}, "label_names is dict"),
    "input_size": ({"input_size": '"big"'}, "input_size is 'big', not a size"),
    "input_size 2d": ({"input_size": "[32, 32]"}, "input_size is [32, 32], not a size"),
    "mean": ({"mean": "[0.5]"}, "mean is [0.5], not 3 numbers"),
    "std strings": ({"std": '["a", "b", "c"]'}, "std is ['a', 'b', 'c'], not 3 numbers"),
    "crop_pct": ({"crop_pct": "-1"}, "crop_pct is -1, not a positive number"),
    "interpolation": ({"interpolation": "sharp"}, "interpolation is 'sharp'"),
    "output": ({"output": "boxes"}, "output is 'boxes'"),
    "std missing": ({"std": None}, "std is missing"),
}


@pytest.mark.parametrize("fault", list(ONNX_FAULTS))
def test_onnx_metadata_fields_are_checked_where_read(tmp_path, fault):
    pytest.importorskip("onnxruntime")
    from stvit_core.onnx_runtime import read_onnx_metadata

    edit, expected = ONNX_FAULTS[fault]
    meta = {k: v for k, v in {**ONNX_META, **edit}.items() if v is not None}
    path = _onnx_file(tmp_path / "m.onnx", meta)
    with pytest.raises(CheckpointError) as info:
        read_onnx_metadata(path)
    assert str(info.value).startswith(f"{path}: metadata ")
    assert expected in str(info.value)


def test_predict_reports_edited_onnx_metadata_in_one_line(tmp_path, image):
    pytest.importorskip("onnxruntime")
    path = _onnx_file(tmp_path / "m.onnx", {**ONNX_META, "label_names": '["a", "b"]'})
    result = run_cli("predict", path, image)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {path}: metadata label_names has 2 names but the model has 10 outputs"


def test_untampered_onnx_metadata_reads(tmp_path):
    pytest.importorskip("onnxruntime")
    from stvit_core.onnx_runtime import onnx_data_config, read_onnx_metadata

    meta = read_onnx_metadata(_onnx_file(tmp_path / "m.onnx", ONNX_META))
    assert meta["label_names"][9] == "class9"
    assert onnx_data_config(meta)["input_size"] == (3, 32, 32)


# --- a training checkpoint for --resume with a missing or mistyped entry; options that change the run ---------

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A one-epoch run of a tiny STViT on 3 classes: (its finetune arguments, its checkpoint)."""
    from .train_utils import make_subset, tiny_stvit

    root = tmp_path_factory.mktemp("run")
    data = make_subset(root / "data", 4, 2, classes=["bag", "coat", "dress"])
    torch.manual_seed(0)
    model_dir = stvit_core.save_model(tiny_stvit(num_classes=3), root / "model")
    args = ["finetune", "-m", model_dir, "-d", data, "-o", root / "out", "--epochs", "1", "-b", "4", "--workers", "0",
            "--device", "cpu"]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    (root / "stderr.txt").write_text(result.stderr)
    return args, root / "out" / "checkpoints" / "last.pth"


CHECKPOINT_FAULTS = {
    "no optimizer": (lambda c: c.pop("optimizer"), "optimizer is missing"),
    "rng None": (lambda c: c.update(rng=None), "rng is None, not a list"),
    "rng empty": (lambda c: c.update(rng=[]), "rng is [], not a list of each process's RNG states"),
    "string epoch": (lambda c: c.update(epoch="1"), "epoch is '1', not a whole number"),
    "negative epoch": (lambda c: c.update(epoch=-1), "epoch is -1, not a whole number"),
    "negative step": (lambda c: c.update(num_updates=-3), "num_updates is -3, not a whole number"),
    "meters": (lambda c: c["meters"].pop("count"), "meters is a dict of 2 entries, not {loss_sum, count, seconds}"),
    "best": (lambda c: c.update(best=None), "best is None, not {top1, epoch}"),
    "model": (lambda c: c.update(model={"x": 1}), "model is a dict of 1 entries, not a state dict of tensors"),
    "scheduler": (lambda c: c.update(scheduler=[]), "scheduler is [], not a scheduler state dict"),
    "config": (lambda c: c.pop("config"), "config is missing"),
    "version": (lambda c: c.update(version=99), "version is 99"),
}


@pytest.mark.parametrize("fault", list(CHECKPOINT_FAULTS))
def test_training_checkpoint_entries_are_checked_where_read(finished_run, tmp_path, fault):
    from stvit_core.train_state import load_training_checkpoint

    _, last = finished_run
    change, expected = CHECKPOINT_FAULTS[fault]
    ckpt = torch.load(last, weights_only=True)
    change(ckpt)
    path = tmp_path / "last.pth"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as info:
        load_training_checkpoint(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_resume_from_a_tampered_checkpoint_is_one_line(finished_run, tmp_path):
    args, last = finished_run
    ckpt = torch.load(last, weights_only=True)
    ckpt["epoch"] = -1
    bad = tmp_path / "last.pth"
    torch.save(ckpt, bad)
    result = run_cli(*args[:-8], "-o", tmp_path / "out", *args[-6:], "--resume", bad)
    assert result.returncode == 1
    assert result.stderr.strip() == f"Error: {bad}: epoch is -1, not a whole number"


@pytest.mark.parametrize("option, value, saved", [("--seed", "1", "0"), ("--batch-size", "2", "4"),
                                                  ("--epochs", "2", "1"), ("--lr", "0.1", "None")])
def test_resume_with_options_that_change_the_run_is_refused(finished_run, option, value, saved):
    args, last = finished_run
    config = (last.parent.parent / "config.yaml").read_text()
    if option in args:
        i = args.index(option)
        args = [*args[:i], *args[i + 2:]]
    result = run_cli(*args, option, value, "--resume", last)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"Error: {option} {value} differs from the run being resumed, which has {saved} ({last}): a resumed run "
        "continues with its own options (start a new run to change it)")
    assert (last.parent.parent / "config.yaml").read_text() == config


def test_resuming_a_finished_run_leaves_its_record(finished_run):
    args, last = finished_run
    config = last.parent.parent / "config.yaml"
    before = config.read_text()
    result = run_cli(*args, "--quiet", "--resume", last)  # options that may change
    assert result.returncode == 0, result.stderr
    assert "all 1 epochs are done" in result.stderr
    assert config.read_text() == before and "quiet: false" in before


# --- a YAML config that is not UTF-8 -------------------------------------------------------------------------

def test_a_config_file_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_bytes("epochs: 2\nseed: 1  # caf\u00e9\n".encode("latin-1"))
    result = run_cli("finetune", "-m", "stvit_deit_tiny_patch16_224", "-d", tmp_path, "-o", tmp_path / "out",
                     "--config", config)
    assert result.returncode == 2
    assert result.stderr.strip() == f"Error: cannot read config file {config}: not UTF-8 text (byte 0xe9 at offset 24)"
    assert not (tmp_path / "out").exists()


# --- model arguments the data or the model cannot take ---------------------------------------------------------

TINY_ARGS = ["--model-arg", "img_size=28", "--model-arg", "embed_dim=48", "--model-arg", "depth=6",
             "--num-classes", "3"]


@pytest.mark.parametrize("spec, extra, expected", [
    ("stvit_deit_tiny_patch16_224", ["--model-arg", "in_chans=1", "--model-arg", "patch_size=4"],
     "Error: the model takes 1-channel images (in_chans=1), but images are read as RGB, 3 channels: build it with "
     "in_chans=3 (the default)"),
    ("stvit_deit_tiny_patch16_224", ["--model-arg", "patch_size=0"], "Error: cannot build stvit_deit_tiny_patch16_224 "
     "with {'img_size': 28, 'embed_dim': 48, 'depth': 6, 'patch_size': 0, 'num_classes': 3, 'drop_path_rate': 0.1}: "
     "integer division or modulo by zero"),
    ("deit_tiny", ["--model-arg", "num_heads=0"], "Error: cannot build deit_tiny with"),
    # a setting with its own option: one of two values would silently win
    ("deit_tiny", ["--model-arg", "drop_path_rate=0.3"], "Error: --model-arg drop_path_rate: set it with --drop-path"),
    ("deit_tiny", ["--model-arg", "num_classes=3"],
     "Error: --model-arg num_classes and --num-classes both set the head: give --num-classes only"),
])
def test_model_arguments_that_cannot_run_are_one_line_before_training(finished_run, tmp_path, spec, extra, expected):
    args, _ = finished_run
    data = args[args.index("-d") + 1]
    result = run_cli("finetune", "-m", spec, "--no-pretrained", "--tokens", "4", *TINY_ARGS, *extra, "-d", data,
                     "-o", tmp_path / "out", "--epochs", "1", "-b", "4", "--workers", "0", "--device", "cpu")
    assert result.returncode in (1, 2)
    assert result.stderr.strip().startswith(expected), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_predict_with_a_model_of_other_input_channels_is_one_line(tmp_path, image):
    torch.manual_seed(0)
    model = timm.create_model("stvit_deit_tiny_patch16_224", **TINY_VIT, num_semantic_tokens=4, in_chans=1)
    target = stvit_core.save_model(model, tmp_path / "grey")
    result = run_cli("predict", target, image)
    assert result.returncode == 1
    assert result.stderr.strip() == ("Error: the model takes 1-channel images (in_chans=1), but images are read as "
                                     "RGB, 3 channels: build it with in_chans=3 (the default)")


def test_an_empty_training_class_folder_is_named_as_empty(finished_run, tmp_path):
    args, _ = finished_run
    data = tmp_path / "data"
    shutil.copytree(args[args.index("-d") + 1], data)
    for f in (data / "train" / "coat").iterdir():
        f.unlink()
    result = run_cli(*args[:3], "-d", data, "-o", tmp_path / "out", *args[7:])
    assert result.returncode == 1
    assert result.stderr.strip().startswith(f"Error: class folder {data / 'train' / 'coat'} has no images (.png, ")
    assert result.stderr.strip().endswith("add its images or remove the folder")


# --- top-5 accuracy of a model with five classes or fewer ---------------------------------------------------------

def test_top5_of_five_classes_or_fewer_is_not_applicable(finished_run, tmp_path):
    args, last = finished_run  # 3 classes
    rows = [json.loads(line) for line in (last.parent.parent / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["top5"] is None and rows[-1]["top1"] is not None
    assert json.loads((last.parent.parent / "best" / "results.json").read_text())["top5"] is None
    assert "  top5 n/a  " in (last.parent.parent.parent / "stderr.txt").read_text()  # the epoch line
    data = args[args.index("-d") + 1]
    result = run_cli("eval", "folder", "-m", last.parent.parent / "best", "-d", data, "--device", "cpu", "--json",
                     "--workers", "0", "--results-file", tmp_path / "r.csv")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["top5"] is None
    assert (tmp_path / "r.csv").read_text().splitlines()[1].split(",")[2] == ""
    text = run_cli("eval", "folder", "-m", last.parent.parent / "best", "-d", data, "--device", "cpu", "--workers", "0")
    assert text.returncode == 0, text.stderr
    assert "  top-5 n/a  " in text.stdout


def test_top5_applies_above_five_classes():
    from stvit_core.evaluate import top5_applies

    assert [top5_applies(n) for n in (1, 5, 6, 1000, None)] == [False, False, True, True, True]
