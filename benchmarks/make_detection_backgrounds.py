"""Build the background photos of the pasted-objects detection set (stvit_core/data/detection_backgrounds).

    pip install scikit-image
    python benchmarks/make_detection_backgrounds.py [--max-side 320] [--quality 85]

Takes four colour photos shipped with scikit-image (``skimage.data``) whose docstrings state that they are
free of copyright restrictions, downscales them so that the longer side is ``--max-side`` pixels and writes
them as JPEG next to a NOTICE file that records each photo's source and licence. Deterministic.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

TARGET = Path(__file__).resolve().parents[1] / "stvit_core" / "data" / "detection_backgrounds"

# name in skimage.data -> licence statement, as written in that function's docstring (scikit-image 0.26)
PHOTOS = {
    "astronaut": "Eileen Collins, NASA Great Images database (https://flic.kr/p/r9qvLn); "
                 "\"No known copyright restrictions, released into the public domain.\"",
    "chelsea": "Chelsea the cat, by Stefan van der Walt; \"No copyright restrictions. CC0 by the photographer.\"",
    "coffee": "Coffee cup, courtesy of Pikolo Espresso Bar, by Rachel Michetti; "
              "\"No copyright restrictions. CC0 by the photographer.\"",
    "rocket": "Launch of DSCOVR on Falcon 9, SpaceX "
              "(https://www.flickr.com/photos/spacexphotos/16511594820/); released into the public domain by SpaceX.",
}

NOTICE = """Background photos of the pasted-objects detection set (stvit_core/detection_data.py).

Downscaled copies (longer side {max_side} px, JPEG quality {quality}) of colour photos distributed with
scikit-image {version} as skimage.data (https://scikit-image.org), made by
benchmarks/make_detection_backgrounds.py. Each photo's source and licence, as stated in its skimage.data
docstring:

{lines}
"""


def main() -> None:
    import skimage
    import skimage.data

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-side", type=int, default=320)
    p.add_argument("--quality", type=int, default=85)
    args = p.parse_args()
    TARGET.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        image = Image.fromarray(getattr(skimage.data, name)())
        scale = args.max_side / max(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image.resize(size, Image.Resampling.LANCZOS).save(TARGET / f"{name}.jpg", quality=args.quality)
    lines = "\n".join(f"- {name}.jpg: {text}" for name, text in PHOTOS.items())
    notice = NOTICE.format(max_side=args.max_side, quality=args.quality, version=skimage.__version__, lines=lines)
    (TARGET / "NOTICE").write_text(notice)


if __name__ == "__main__":
    main()
