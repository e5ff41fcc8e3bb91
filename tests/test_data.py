"""stvit_core.data on real files: the embedded Fashion-MNIST subset, ImageNet synset folders, bad data."""


import pytest
import torch
from timm.data import ImageNetInfo

from stvit_core import data as stdata
from stvit_core.errors import DataError
from tests.train_utils import make_subset, tiny_stvit


def test_embedded_subset_layout_and_licence():
    root = stdata.embedded_dataset_path()
    assert stdata.resolve_data_root("fashion-mnist") == root
    assert "Zalando" in (root / "LICENSE").read_text() and "Permission is hereby granted" in (root / "LICENSE").read_text()
    train = stdata.folder_dataset(stdata.split_folder(root, "train"), None)
    val = stdata.folder_dataset(stdata.split_folder(root, "val"), None)
    assert len(train) == 2000 and len(val) == 500
    assert len(train.class_to_idx) == 10 and train.class_to_idx == val.class_to_idx
    assert sorted(train.targets) == sorted(list(range(10)) * 200)
    img, target = train[0]
    assert img.mode == "RGB" and img.size == (28, 28)  # grey PNG decoded as three equal channels
    r, g, b = img.split()
    assert r.tobytes() == g.tobytes() == b.tobytes()


def test_model_preprocessing_uses_current_input_size():
    model = tiny_stvit()
    cfg = stdata.model_data_config(model)
    assert tuple(cfg["input_size"]) == (3, 28, 28)
    x, _ = stdata.folder_dataset(stdata.embedded_dataset_path() / "val", stdata.build_transform(cfg, training=False))[0]
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    cfg = stdata.model_data_config(tiny_stvit())
    tf = stdata.build_transform(cfg, training=True, auto_augment="rand-m9-mstd0.5", re_prob=0.25)
    ds = stdata.folder_dataset(stdata.embedded_dataset_path() / "train", tf, seed=3)
    torch.manual_seed(0)
    a = ds[5][0]
    torch.manual_seed(123)  # the caller's RNG does not matter...
    b = ds[5][0]
    assert torch.equal(a, b)
    ds.set_epoch(1)  # ...but the epoch does
    assert not torch.equal(a, ds[5][0])
    state = torch.get_rng_state()
    ds[6]
    assert torch.equal(state, torch.get_rng_state())  # and the caller's RNG is left untouched


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="not found"):
        stdata.split_folder(tmp_path / "nope", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        stdata.folder_dataset(tmp_path / "empty", None)
    (tmp_path / "noimg" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        stdata.folder_dataset(tmp_path / "noimg", None)


def test_corrupt_image_fails_with_its_name(tmp_path):
    root = make_subset(tmp_path / "d", 3, 1, classes=["bag", "coat"])
    bad = root / "train" / "coat" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = stdata.folder_dataset(root / "train", None)
    index = [i for i in range(len(ds)) if ds.filename(i).endswith("broken.png")][0]
    with pytest.raises(DataError, match="broken.png"):
        ds[index]
    assert stdata.check_images(root / "train") == [str(bad)]


def test_training_class_count_check(tmp_path):
    ds = stdata.folder_dataset(stdata.embedded_dataset_path() / "val", None)
    stdata.check_num_classes(ds, 10)
    for head in (1000, 5):  # training needs the head to be exactly the data's classes
        with pytest.raises(DataError, match="--num-classes 10"):
            stdata.check_num_classes(ds, head)


def test_imagenet_folder_uses_timm_synset_order(tmp_path):
    synsets = ImageNetInfo().label_names()
    chosen = [synsets[7], synsets[321]]
    for name in chosen:
        (tmp_path / name).mkdir()
    src = sorted((stdata.embedded_dataset_path() / "val" / "bag").iterdir())
    for i, name in enumerate(chosen):
        for f in src[i * 2:(i + 1) * 2 + i]:
            (tmp_path / name / f.name).write_bytes(f.read_bytes())
    ds = stdata.imagenet_dataset(tmp_path, None)
    assert sorted(ds.targets) == [7, 7, 321, 321, 321]
    (tmp_path / "not_a_synset").mkdir()
    with pytest.raises(DataError, match="not ImageNet-1k synsets"):
        stdata.imagenet_dataset(tmp_path, None)
