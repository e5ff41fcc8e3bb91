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
