"""``stvit eval imagenet`` / ``stvit eval folder`` on real images, with a model whose answers are known."""

import csv
import json

import pytest
import torch
from timm.data import ImageNetInfo

from stvit_core import save_model
from stvit_core.data import embedded_dataset_path, folder_classes
from tests.train_utils import assert_one_line_error, cli, cli_in_process, tiny_stvit, unwritable_dir

# ImageNet class index -> number of images in its synset folder
COUNTS = {0: 3, 100: 4, 200: 2, 300: 5, 400: 1, 500: 2, 900: 3}
# The head ignores the image and always ranks these classes first, in this order.
RANKED = [100, 200, 300, 400, 500]


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory):
    model = tiny_stvit(tokens=4, num_classes=1000)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        for rank, index in enumerate(RANKED):
            model.head.bias[index] = 10.0 - rank
    path = tmp_path_factory.mktemp("m") / "biased"
    save_model(model, path)
    return path, model.head.bias.detach().clone()


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet") / "val"
    synsets = ImageNetInfo().label_names()
    images = sorted((embedded_dataset_path() / "val" / "coat").iterdir())
    used = 0
    for index, n in COUNTS.items():
        folder = root / synsets[index]
        folder.mkdir(parents=True)
        for f in images[used:used + n]:
            (folder / f.name).write_bytes(f.read_bytes())  # grey PNGs: decoded to RGB by the loader
        used += n
    return root


def test_eval_imagenet_counts_topk_and_loss(biased_model, imagenet_dir, tmp_path):
    path, bias = biased_model
    results_csv = tmp_path / "r.csv"
    r = cli(["eval", "imagenet", "-m", str(path), "-d", str(imagenet_dir), "--json", "-b", "4", "--workers", "0",
             "--results-file", str(results_csv)])
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    total = sum(COUNTS.values())
    assert result["images"] == total
    assert result["top1"] == pytest.approx(100 * COUNTS[100] / total, abs=1e-3)
    assert result["top5"] == pytest.approx(100 * sum(COUNTS[i] for i in RANKED) / total, abs=1e-3)
    log_z = torch.logsumexp(bias, 0).item()
    expected_loss = sum(n * (log_z - bias[i].item()) for i, n in COUNTS.items()) / total
    assert result["loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert result["params"] > 0 and result["gflops"] > 0 and result["img_per_sec"] > 0
    assert result["input_size"] == [3, 28, 28]
    row = next(csv.DictReader(results_csv.open()))
    assert float(row["top1"]) == result["top1"] and int(row["images"]) == total


def test_eval_imagenet_accepts_root_with_val_and_writes_json(biased_model, imagenet_dir, tmp_path):
    r = cli_in_process(["eval", "imagenet", "-m", str(biased_model[0]), "-d", str(imagenet_dir.parent), "--workers", "0",
             "--results-file", str(tmp_path / "r.json")])
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "GFLOPs" in r.stdout
    assert json.loads((tmp_path / "r.json").read_text())["images"] == sum(COUNTS.values())


FASHION = folder_classes(embedded_dataset_path() / "val")


def _model_dir(tmp_path, name, label_names=None, num_classes=10):
    model = tiny_stvit(tokens=4, num_classes=num_classes)
    if label_names is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, "label_names": label_names, "num_classes": num_classes}
    return save_model(model, tmp_path / name)


def test_eval_folder_without_label_names_needs_one_output_per_folder(biased_model, tmp_path):
    # 1000 outputs and 10 folders: nothing says which output is which folder (this used to report 0.00%)
    r = cli_in_process(["eval", "folder", "-m", str(biased_model[0]), "-d", "fashion-mnist", "--workers", "0"])
    assert_one_line_error(r, "10 class folders", "1000 outputs and no label names")
    assert r.stdout == ""
    r = cli_in_process(["eval", "folder", "-m", str(_model_dir(tmp_path, "ten")), "-d", "fashion-mnist", "--json",
                        "-b", "250", "--workers", "0"])  # as many outputs as folders: natural folder order
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["images"] == 500


def test_eval_folder_warns_when_label_names_miss_folders_and_refuses_when_none_match(tmp_path):
    renamed = ["zebra", "yak", *FASHION[2:]]  # two of the folders are not among the model's classes
    r = cli_in_process(["eval", "folder", "-m", str(_model_dir(tmp_path, "partial", renamed)), "-d", "fashion-mnist",
                        "--json", "-b", "250", "--workers", "0"])
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1 and warnings[0].startswith("Warning: 2 of the 10 class folders"), r.stderr
    assert FASHION[0] in warnings[0] and FASHION[1] in warnings[0]
    result = json.loads(r.stdout)
    assert result["images"] == 400 and result["warnings"] == [warnings[0][len("Warning: "):]]
    r = cli_in_process(["eval", "folder", "-m", str(_model_dir(tmp_path, "other", [f"c{i}" for i in range(10)])),
                        "-d", "fashion-mnist", "--workers", "0"])
    assert_one_line_error(r, "none of the 10 class folders", "c0, c1, c2")


def test_eval_imagenet_with_a_head_of_other_classes_says_what_to_do(imagenet_dir, tmp_path):
    r = cli_in_process(["eval", "imagenet", "-m", str(_model_dir(tmp_path, "ten")), "-d", str(imagenet_dir)])
    assert_one_line_error(r, "10 outputs, not ImageNet-1k's 1000", "stvit eval folder")
    assert "--num-classes" not in r.stderr


def test_a_results_file_that_cannot_be_written_or_exists_fails_before_evaluating(biased_model, imagenet_dir,
                                                                                 tmp_path):
    args = ["eval", "imagenet", "-m", str(biased_model[0]), "-d", str(imagenet_dir), "--workers", "0"]
    results = unwritable_dir(tmp_path) / "r.csv"
    r = cli_in_process([*args, "--results-file", str(results)])
    assert_one_line_error(r, "cannot write", str(results))
    assert r.returncode == 1 and r.stdout == ""  # known before evaluating: nothing printed
    r = cli_in_process([*args, "--results-file", str(tmp_path / "missing" / "r.csv")])
    assert_one_line_error(r, "does not exist")
    assert r.returncode == 1 and r.stdout == ""
    (tmp_path / "file").write_text("a file, not a folder")
    r = cli_in_process([*args, "--results-file", str(tmp_path / "file" / "r.csv")])
    assert_one_line_error(r, "is a file, not a folder")
    existing = tmp_path / "r.json"
    existing.write_text("an earlier result")
    r = cli_in_process([*args, "--results-file", str(existing)])
    assert_one_line_error(r, "already exists", "--force")
    assert r.stdout == "" and existing.read_text() == "an earlier result"
    r = cli_in_process([*args, "--results-file", str(existing), "--force"])
    assert r.returncode == 0, r.stderr
    assert "top-1 20.00%" in r.stdout and json.loads(existing.read_text())["top1"] == pytest.approx(20.0)
    r = cli_in_process([*args, "--force"])
    assert_one_line_error(r, "--force applies to --results-file only")


@pytest.mark.slow
def test_eval_bad_inputs(biased_model, tmp_path):
    r = cli(["eval", "imagenet", "-m", str(biased_model[0]), "-d", str(tmp_path / "missing")], fresh_process=True)
    assert_one_line_error(r, "not found")
    r = cli_in_process(["eval", "imagenet", "-m", str(biased_model[0]), "-d", str(embedded_dataset_path() / "val")])
    assert_one_line_error(r, "not ImageNet-1k synsets")
    r = cli_in_process(["eval", "folder", "-m", str(tmp_path / "no_model"), "-d", "fashion-mnist"])
    assert_one_line_error(r)
    r = cli_in_process(["eval", "folder", "-m", str(biased_model[0]), "-d", "fashion-mnist", "--results-file", "x.txt"])
    assert_one_line_error(r, ".csv or .json")


def test_help_offers_the_embedded_subset_only_where_it_can_be_used():
    """'fashion-mnist' has 10 classes: a value for `eval folder`, never for `eval imagenet`."""
    imagenet, folder = (cli(["eval", kind, "--help"]).stdout for kind in ("imagenet", "folder"))
    assert "fashion-mnist" not in imagenet and "synset folders" in imagenet
    assert "'fashion-mnist' for the embedded subset" in folder
