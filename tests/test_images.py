"""stvit_core.images on real files: EXIF orientation, 16-bit and float images, every format a folder scan takes,
and what predict makes of a phone photo stored sideways."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import stvit_core  # noqa: F401  (registers the models)
from stvit_core.data import folder_dataset
from stvit_core.errors import DataError
from stvit_core.images import IMAGE_EXTENSIONS, find_images, read_image
from stvit_core.predict import TorchClassifier, predict_images

from .train_utils import cli_in_process

ORIENTATION = 0x0112  # the EXIF tag


def _picture(width: int = 48, height: int = 32) -> Image.Image:
    """An asymmetric RGB picture in 8x8 blocks (JPEG keeps them nearly exact): red top left, blue bottom."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    blocks[0, 0] = (255, 0, 0)
    blocks[-1, :] = (0, 0, 255)
    return Image.fromarray(blocks.repeat(8, axis=0).repeat(8, axis=1))


def _stored_sideways(path, upright: Image.Image) -> None:
    """Save as a camera does when held upright: pixels turned 90 degrees left, orientation 6 (turn right to view)."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    upright.transpose(Image.Transpose.ROTATE_90).save(path, quality=100, subsampling=0, exif=exif)


def test_an_exif_rotated_jpeg_reads_upright(tmp_path):
    upright = _picture()
    _stored_sideways(tmp_path / "phone.jpg", upright)
    with Image.open(tmp_path / "phone.jpg") as raw:
        assert raw.size == (32, 48) and raw.getexif()[ORIENTATION] == 6  # as stored: sideways
    image = read_image(tmp_path / "phone.jpg")
    assert image.mode == "RGB" and image.size == upright.size == (48, 32)
    pixels, expected = np.asarray(image, dtype=np.int16), np.asarray(upright, dtype=np.int16)
    assert np.abs(pixels - expected).max() <= 8, "the picture as it was taken, not turned"
    assert tuple(pixels[2, 2]) == pytest.approx((255, 0, 0), abs=8) and pixels[-2, :, 2].min() >= 240


def test_a_16_bit_png_reads_with_its_grey_levels(tmp_path):
    levels = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(levels).save(tmp_path / "scan.png")
    with Image.open(tmp_path / "scan.png") as raw:
        assert raw.mode.startswith("I"), raw.mode  # 16 bits per pixel in the file
    image = np.asarray(read_image(tmp_path / "scan.png"))
    assert image.shape == (2, 4, 3) and (image[..., 0] == image[..., 2]).all()
    np.testing.assert_array_equal(image[..., 0], np.round(levels / 257).astype(np.uint8))
    assert image[0].tolist() == [[0] * 3, [1] * 3, [128] * 3, [255] * 3]  # was all 255 (clipped)


def test_float_images_scale_from_the_unit_range(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "depth.tif")
    image = np.asarray(read_image(tmp_path / "depth.tif"))
    np.testing.assert_array_equal(image[..., 1], [[0, 64, 128, 255]])


def test_folders_give_every_format_pillow_reads(tmp_path):
    """.webp, .bmp, .tif (and the usual three) are found, in natural order; other files are not; the dataset
    of finetune/eval takes the same files."""
    picture = _picture(16, 16)
    names = ["a.png", "b.jpg", "c.webp", "d.bmp", "e.tif", "f.tiff", "g10.jpeg", "g9.JPG"]
    for split in ("flat", "tree/shirt"):
        (tmp_path / split).mkdir(parents=True)
        for name in names:
            picture.save(tmp_path / split / name)
        (tmp_path / split / "notes.txt").write_text("not an image")
    assert {".webp", ".bmp", ".tif", ".tiff"} <= set(IMAGE_EXTENSIONS)
    images, errors = find_images([tmp_path / "flat"])
    assert errors == [] and [p.name for p in images] == [*names[:6], "g9.JPG", "g10.jpeg"]
    assert all(read_image(p).size == (16, 16) for p in images)
    dataset = folder_dataset(tmp_path / "tree", transform=None)
    assert sorted(p.rsplit("/", 1)[-1] for p in map(dataset.filename, range(len(dataset)))) == sorted(names)


def test_missing_paths_empty_folders_and_broken_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    images, errors = find_images([tmp_path / "empty", tmp_path / "gone.png", tmp_path / "broken.png"])
    assert images == [tmp_path / "broken.png"]
    assert [e["image"] for e in errors] == [str(tmp_path / "empty"), str(tmp_path / "gone.png")]
    assert errors[0]["error"].startswith(f"no images in {tmp_path / 'empty'} (.png, .jpg, .jpeg")
    broken = tmp_path / "broken.png"
    with pytest.raises(DataError) as caught:
        read_image(broken)
    assert str(caught.value) == f"cannot read image {broken}: cannot identify image file {str(broken)!r}"


def test_predict_classifies_a_sideways_stored_photo_as_the_upright_one(tmp_path):
    """The same logits for the EXIF-rotated JPEG and the upright picture it shows (its decoded pixels turned
    and saved losslessly), and other logits for the pixels as stored: orientation matters to the model."""
    torch.manual_seed(0)
    model = timm.create_model("stvit_deit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=48, depth=6,
                              num_heads=2, num_image_blocks=2, num_semantic_tokens=16, num_classes=10).eval()
    _stored_sideways(tmp_path / "phone.jpg", _picture(64, 40))
    with Image.open(tmp_path / "phone.jpg") as raw:
        stored = raw.convert("RGB")
    stored.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    stored.save(tmp_path / "sideways.png")
    classifier = TorchClassifier(model, device="cpu")
    result = predict_images(classifier, [tmp_path / "phone.jpg", tmp_path / "upright.png", tmp_path / "sideways.png"],
                            top_k=10)
    assert result["errors"] == []
    phone, upright, sideways = (p["top_k"] for p in result["predictions"])
    assert phone == upright
    assert phone != sideways
    logits = [model(classifier.transform(read_image(tmp_path / name))[None])
              for name in ("phone.jpg", "upright.png", "sideways.png")]
    assert torch.equal(logits[0], logits[1]) and not torch.allclose(logits[0], logits[2])


def test_predict_help_names_the_formats_a_folder_scan_takes():
    text = " ".join(cli_in_process(["predict", "--help"]).stdout.split())
    assert f"({', '.join(IMAGE_EXTENSIONS)};" in text
