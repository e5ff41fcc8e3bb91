"""Does `stvit vis` show something real? Semantic tokens' attention on objects, before and after fine-tuning.

    OMP_NUM_THREADS=2 PYTHONPATH=. python benchmarks/vis_object_mass.py --work runs/vis-check [--epochs 10]

Fashion-MNIST items are grey objects on a black background, so where the object is can be read off the pixels:
an input pixel (the image as the model sees it, normalisation undone) belongs to the object when its grey level
is above --threshold. The check:

1. builds the demo's model (`stvit demo`, stvit_core.demo: a randomly initialised DeiT-Tiny layout, width 64,
   32 px, 64 image tokens, converted to STViT with 16 semantic tokens; WORK/converted) and fine-tunes it with the
   demo's settings on DATA/train (default: the 2000 training images of the embedded subset; WORK/finetune/best).
   Both are reused when WORK already holds them;
2. for the images of DATA/val and each generator layer, measures with stvit_core.vis the part of the semantic
   tokens' attention (over image tokens) that lands on object pixels (`attention_on_region`), for the model
   before and after fine-tuning, against the objects' share of the image (what attention spread evenly would
   give).

If the attention means something, fine-tuning moves it onto the objects: the mass after fine-tuning is clearly
above the objects' share and above the mass before. Prints a Markdown table and writes WORK/vis_object_mass.json.
The fine-tune dominates the time (the demo's: about a minute on 2 idle CPU cores for 10 epochs).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any, Dict

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stvit_core import load_model, save_model  # noqa: E402
from stvit_core.data import build_transform, embedded_dataset_path, folder_dataset, model_data_config  # noqa: E402
from stvit_core.demo import DEMO_SOURCE, DEMO_SOURCE_NAME  # noqa: E402
from stvit_core.vis import (  # noqa: E402
    attention_on_region,
    check_vis_arguments,
    semantic_token_attention,
    token_partition,
)


def prepare(work: Path, data: Path, epochs: int) -> Dict[str, Any]:
    """The converted model (WORK/converted) and its fine-tune (WORK/finetune/best), as `stvit demo` makes them
    (the demo's timings are left out)."""
    import timm

    from stvit_core.convert import convert_model
    from stvit_core.train import resolve_config, train

    torch.manual_seed(0)
    source = timm.create_model(DEMO_SOURCE_NAME, pretrained=False, **DEMO_SOURCE).eval()
    stvit = convert_model(source, num_semantic_tokens=16)
    save_model(stvit, work / "converted", force=True)
    cfg = resolve_config(overrides=dict(
        data=str(data), output=str(work / "finetune"), epochs=epochs, batch_size=64, lr=1e-3, warmup_epochs=1,
        min_lr=1e-5, drop_path=0.0, scale_min=0.35, workers=0, seed=0, quiet=True))
    result = train(cfg, stvit, force=True)
    return {"epochs": epochs, "best_top1": round(float(result["best_top1"]), 2)}


def measure(model: torch.nn.Module, val: Path, threshold: float, layer: int) -> Dict[str, float]:
    """Mean attention mass on object pixels and mean object share over the validation images."""
    config = model_data_config(model)
    dataset = folder_dataset(val, build_transform(config, training=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=100, shuffle=False)
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    masses, shares, purities, regions = [], [], [], []
    for images, _ in loader:
        grey = (images * std + mean).clamp(0, 1).mean(1)  # the input as the model sees it, in grey
        attn = semantic_token_attention(model, images, layer=layer)
        mass, share = attention_on_region(attn, grey > threshold)
        purity, count = partition_purity(token_partition(attn), attn.shape[1], grey > threshold)
        masses.append(mass)
        shares.append(share)
        purities.append(purity)
        regions.append(count)
    mass, share = torch.cat(masses), torch.cat(shares)
    return {"mass_on_objects": round(float(mass.mean()), 4), "object_share": round(float(share.mean()), 4),
            "images_above_share": round(float((mass > share).float().mean()), 4),
            "partition_purity": round(float(torch.cat(purities).mean()), 4),
            "regions": round(float(torch.cat(regions).mean()), 2), "images": len(mass)}


def partition_purity(partition: torch.Tensor, num_tokens: int, mask: torch.Tensor):
    """Does the partition follow the object's outline? Each image token is object when over half its pixels
    are; purity is the share of image tokens whose region's majority (object or background) is their own kind
    (1: every region lies on one side of the outline). Also returns the number of regions per image."""
    is_object = F.adaptive_avg_pool2d(mask.float()[:, None], tuple(partition.shape[-2:]))[:, 0] > 0.5
    members = F.one_hot(partition.flatten(1), num_tokens).float()  # (B, N, S)
    total, on_object = members.sum(1), (members * is_object.flatten(1)[..., None].float()).sum(1)
    purity = torch.maximum(on_object, total - on_object).sum(1) / partition[0].numel()
    return purity, (total > 0).sum(1).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("runs/vis-check"), help="models (reused if there)")
    parser.add_argument("--data", type=Path, default=embedded_dataset_path(), help="ImageFolder with train/, val/")
    parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs (the demo's default)")
    parser.add_argument("--threshold", type=float, default=0.2, help="grey level above which a pixel is object")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    before_dir, after_dir = args.work / "converted", args.work / "finetune" / "best"
    trained: Dict[str, Any] = {}
    if not (before_dir.is_dir() and after_dir.is_dir()):
        trained = prepare(args.work, args.data, args.epochs)
    before, after = load_model(before_dir).eval(), load_model(after_dir).eval()
    rows = []
    for layer in range(check_vis_arguments(after)[0] + 1):
        for name, model in (("before fine-tuning", before), ("after fine-tuning", after)):
            rows.append({"model": name, "layer": layer, **measure(model, args.data / "val", args.threshold, layer)})
    result = {"work": str(args.work), "data": str(args.data), "threshold": args.threshold, **trained, "rows": rows,
              "torch": torch.__version__, "machine": platform.machine()}
    (args.work / "vis_object_mass.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"object pixels: grey > {args.threshold}; {rows[0]['images']} validation images; "
          f"fine-tuned val top-1 {trained.get('best_top1', 'n/a (reused)')}")
    print("| model | generator layer | attention mass on objects | objects' share of the image | images above share "
          "| partition purity | regions |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layer']} | {r['mass_on_objects']:.3f} | {r['object_share']:.3f} | "
              f"{100 * r['images_above_share']:.0f}% | {r['partition_purity']:.3f} | {r['regions']:.1f} |")


if __name__ == "__main__":
    main()
