"""Build the embedded Fashion-MNIST subset (stvit_core/data/fashion_mnist_subset) from the Debian package.

    apt-get install -y dataset-fashion-mnist
    python benchmarks/make_fashion_mnist_subset.py [--train-per-class 200] [--val-per-class 50]

Reads the gzipped IDX files under /usr/share/datasets/fashion-mnist/ and writes grey 28x28 PNGs in
ImageFolder layout: ``{train,val}/<class_name>/<split>_<index>.png``. The first N images of each class
are taken, train images from the training set and val images from the test set, so the result is
deterministic. Fashion-MNIST is (c) 2017 Zalando SE, MIT licence; the notice is written next to the data.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
COPYRIGHT = Path("/usr/share/doc/dataset-fashion-mnist/copyright")
TARGET = Path(__file__).resolve().parents[1] / "stvit_core" / "data" / "fashion_mnist_subset"
CLASS_NAMES = [
    "t-shirt_top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle_boot",
]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    assert dtype_code == 0x08, "only uint8 IDX files are expected"
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_split(images: np.ndarray, labels: np.ndarray, per_class: int, out: Path, split: str) -> int:
    count = 0
    for label, name in enumerate(CLASS_NAMES):
        folder = out / split / name
        folder.mkdir(parents=True)
        for index in np.flatnonzero(labels == label)[:per_class]:
            Image.fromarray(images[index], ).save(folder / f"{split}_{index:05d}.png", optimize=True)
            count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--output", type=Path, default=TARGET)
    args = parser.parse_args()

    if args.output.exists():
        shutil.rmtree(args.output)
    args.output.mkdir(parents=True)
    n_train = write_split(read_idx(SOURCE / "train-images-idx3-ubyte.gz"),
                          read_idx(SOURCE / "train-labels-idx1-ubyte.gz"),
                          args.train_per_class, args.output, "train")
    n_val = write_split(read_idx(SOURCE / "t10k-images-idx3-ubyte.gz"),
                        read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz"),
                        args.val_per_class, args.output, "val")
    notice = (
        "Fashion-MNIST subset (https://github.com/zalandoresearch/fashion-mnist)\n"
        f"{n_train} training images (first {args.train_per_class} per class of the training set) and {n_val}\n"
        f"validation images (first {args.val_per_class} per class of the test set), 28x28 grey PNG.\n"
        "Built by benchmarks/make_fashion_mnist_subset.py from the Debian package dataset-fashion-mnist.\n\n"
        "Copyright (c) 2017 Zalando SE, https://tech.zalando.com\n\n"
        "The MIT License (Expat), as shipped in /usr/share/doc/dataset-fashion-mnist/copyright:\n\n"
    )
    licence = COPYRIGHT.read_text().split("License: Expat\n")[-1]
    licence = "\n".join(line[1:] if line.startswith(" ") else line for line in licence.splitlines())
    licence = licence.replace("\n.\n", "\n\n")
    (args.output / "LICENSE").write_text(notice + licence.strip() + "\n")
    print(f"wrote {n_train} train + {n_val} val images to {args.output}")


if __name__ == "__main__":
    main()
