"""The CLI's error contract, for every command and a catalogue of bad values.

For each case: a non-zero exit (2 for usage errors and invalid arguments, 1 otherwise), exactly one line on
stderr and it starts with ``Error:``, no traceback anywhere, and nothing left behind: the output folder and
the working directory hold exactly what they held before. Also: every option of every command has a help
text, and a shown default where it takes a value.

Everything runs in-process through click's runner on the real ``stvit`` group (no interpreter start-up), with
the Hub switched to offline mode (or pointed at a closed loopback port) so that nothing leaves the machine.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import click
import pytest
import torch
from click.testing import CliRunner

from stvit_cli.main import cli

from .hub_fixtures import make_tiny_model

HAS_CUDA = torch.cuda.is_available()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/stvit_contract_pwned",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Dict[str, str]:
    """Files the bad invocations point at, outside the folders whose contents are checked."""
    d = tmp_path_factory.mktemp("inputs")
    model = make_tiny_model(d / "stvit-model")
    (d / "blocker").write_text("a file where a folder is expected")
    (d / "empty.pth").write_bytes(b"")
    (d / "random.pth").write_bytes(os.urandom(4096))
    (d / "text.pth").write_text("epoch,loss\n1,0.5\n")
    torch.save({"model": _Exploit()}, d / "exploit.pth")
    torch.save([1, 2, 3], d / "list.pth")
    (d / "not-a-model").mkdir()
    (d / "not-a-model" / "notes.txt").write_text("x")
    (d / "nonempty").mkdir()
    (d / "nonempty" / "keep.txt").write_text("x")
    (d / "existing.onnx").write_bytes(b"an earlier export")
    (d / "existing.png").write_bytes(b"an earlier plot")
    (d / "existing.csv").write_text("an earlier result\n")
    (d / "bad.png").write_text("not an image")
    _plain_deit_dir(d / "plain-deit")
    _plain_onnx(d / "plain.onnx")
    image = d / "images" / "coat.png"
    image.parent.mkdir()
    from stvit_core.data import embedded_dataset_path

    image.write_bytes(next(iter(sorted((embedded_dataset_path() / "val" / "coat").iterdir()))).read_bytes())
    _vis_inputs(d)
    return {"in": str(d), "model": str(model), "weights": str(model / "model.safetensors"), "img": str(image)}


def _plain_deit_dir(path: Path) -> None:
    """A model directory of timm's own DeiT (not an STViT model), tiny."""
    import timm

    from stvit_core import save_model

    save_model(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2,
                                 num_heads=3, num_classes=10), path)


def _plain_onnx(path: Path) -> None:
    """A valid ONNX file that stvit did not write (no preprocessing metadata)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def _vis_inputs(d: Path) -> None:
    """For `stvit vis`: an image of another size than the model's (the plain DeiT is ``_plain_deit_dir``)."""
    from PIL import Image

    Image.new("RGB", (40, 30), (200, 120, 40)).save(d / "image.png")


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _tree(root: Path) -> List[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


USAGE, INVALID, FAILED = 2, 2, 1
FM = ["-d", "fashion-mnist"]
TINY = ["--model-arg", "img_size=28", "--model-arg", "patch_size=4", "--model-arg", "embed_dim=48", "--model-arg",
        "depth=6", "--model-arg", "num_heads=2", "--model-arg", "num_image_blocks=2", "--num-classes", "10"]
FT = ["finetune", "-m", "stvit_deit_tiny_patch16_224", "--no-pretrained", *TINY, *FM, "-o", "{out}/ft"]
EVAL = ["eval", "folder", "-m", "{model}", *FM]
BENCH = ["benchmark", "deit_tiny", "-b", "2", "--rounds", "1", "--round-time", "0.01"]
CONVERT = ["convert", "deit_tiny", "--no-pretrained", "-o", "{out}/c"]
SWIN = ["convert", "swin_tiny", "--no-pretrained", "-o", "{out}/c"]
VIS = ["vis", "{model}", "{in}/image.png", "-o", "{out}/vis"]

EXPORT = ["export", "{model}", "-o", "{out}/m.onnx"]
PREDICT = ["predict", "{model}", "{img}"]
SWEEP = ["benchmark", "deit_tiny", "--rounds", "1", "--round-time", "0.01"]


def _onnxruntime_has_cuda() -> bool:
    try:
        import onnxruntime
    except ImportError:
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


HAS_ORT_CUDA = _onnxruntime_has_cuda()

# (id, arguments, exit code, fragments of the error line, marks and flags); {out} is the checked output folder,
# {in} holds the input files, {model} a saved STViT model directory, {weights} its model.safetensors, {img} an
# image. Flags: "unreachable" (the Hub at a closed port), "no-onnxruntime" / "no-matplotlib" (the import fails).
CATALOGUE: List[Tuple[str, List[str], int, Tuple[str, ...], tuple]] = [
    # -- the group itself
    ("unknown-command", ["nope"], USAGE, ("No such command",), ()),
    ("unknown-group-option", ["--nope"], USAGE, ("No such option",), ()),
    # -- convert: group 1 of issue 11 (a different model than asked for) and its neighbours
    ("convert-tokens-per-window-0", [*SWIN, "--tokens-per-window", "0"], USAGE, ("--tokens-per-window", "x>=1"), ()),
    ("convert-tokens-per-window-negative", [*SWIN, "--tokens-per-window", "-1"], USAGE, ("--tokens-per-window",), ()),
    ("convert-tokens-per-window-5", [*SWIN, "--tokens-per-window", "5"], INVALID, ("--tokens-per-window", "square"), ()),
    ("convert-swin-tokens-7", [*SWIN, "--tokens", "7"], INVALID, ("--tokens is for DeiT/ViT",), ()),
    ("convert-swin-tokens-36", [*SWIN, "--tokens", "36"], INVALID, ("--tokens is for DeiT/ViT",), ()),
    ("convert-deit-tokens-per-window", [*CONVERT, "--tokens-per-window", "4"], INVALID,
     ("--tokens-per-window is for Swin",), ()),
    ("convert-swin-recovery", [*SWIN, "--recovery"], INVALID, ("--recovery is for DeiT/ViT",), ()),
    ("convert-swin-readout-token", [*SWIN, "--readout", "token"], INVALID, ("--readout avg",), ()),
    ("convert-swin-image-blocks", [*SWIN, "--image-blocks", "2"], INVALID, ("--image-blocks",), ()),
    ("convert-tokens-negative", [*CONVERT, "--tokens", "-4"], USAGE, ("--tokens", "x>=1"), ()),
    ("convert-tokens-0", [*CONVERT, "--tokens", "0"], USAGE, ("--tokens",), ()),
    ("convert-tokens-15", [*CONVERT, "--tokens", "15"], INVALID, ("--tokens must be a perfect square",), ()),
    ("convert-tokens-huge", [*CONVERT, "--tokens", "1000000"], INVALID, ("--tokens 1000000 exceeds",), ()),
    ("convert-tokens-not-a-number", [*CONVERT, "--tokens", "many"], USAGE, ("--tokens", "not a valid integer"), ()),
    ("convert-image-blocks-0", [*CONVERT, "--image-blocks", "0"], USAGE, ("--image-blocks",), ()),
    ("convert-image-blocks-huge", [*CONVERT, "--image-blocks", "99"], INVALID, ("99",), ()),
    ("convert-num-classes-0", [*CONVERT, "--num-classes", "0"], USAGE, ("--num-classes",), ()),
    ("convert-img-size-negative", [*CONVERT, "--img-size", "-224"], USAGE, ("--img-size",), ()),
    ("convert-pool-unknown", [*CONVERT, "--pool", "median"], USAGE, ("--pool",), ()),
    ("convert-missing-model", ["convert"], USAGE, ("Missing argument 'MODEL'",), ()),
    ("convert-unknown-model", ["convert", "deit_huge_nonsense", "-o", "{out}/c"], INVALID, ("unknown model",), ()),
    ("convert-not-a-vit", ["convert", "resnet18", "--no-pretrained", "-o", "{out}/c"], INVALID, ("DeiT/ViT",), ()),
    ("convert-checkpoint-and-no-pretrained", [*CONVERT, "--checkpoint", "{weights}"], INVALID, ("exclude",), ()),
    # -- convert: checkpoints that cannot be read (group 3)
    ("convert-checkpoint-missing", ["convert", "deit_tiny", "--checkpoint", "{in}/missing.pth", "-o", "{out}/c"],
     FAILED, ("not found",), ()),
    ("convert-checkpoint-empty", ["convert", "deit_tiny", "--checkpoint", "{in}/empty.pth", "-o", "{out}/c"],
     FAILED, ("not a PyTorch checkpoint (or corrupt)",), ()),
    ("convert-checkpoint-random", ["convert", "deit_tiny", "--checkpoint", "{in}/random.pth", "-o", "{out}/c"],
     FAILED, ("not a PyTorch checkpoint (or corrupt)",), ()),
    ("convert-checkpoint-text", ["convert", "deit_tiny", "--checkpoint", "{in}/text.pth", "-o", "{out}/c"],
     FAILED, ("not a PyTorch checkpoint (or corrupt)",), ()),
    ("convert-checkpoint-pickled-code", ["convert", "deit_tiny", "--checkpoint", "{in}/exploit.pth", "-o", "{out}/c"],
     FAILED, ("refusing to load", "system"), ()),
    ("convert-checkpoint-not-weights", ["convert", "deit_tiny", "--checkpoint", "{in}/list.pth", "-o", "{out}/c"],
     FAILED, ("state dict",), ()),
    ("convert-checkpoint-a-directory", ["convert", "deit_tiny", "--checkpoint", "{in}", "-o", "{out}/c"],
     USAGE, ("--checkpoint", "directory"), ()),
    ("convert-checkpoint-already-stvit", ["convert", "deit_small", "--checkpoint", "{weights}", "-o", "{out}/c"],
     FAILED, ("already an STViT model",), ()),
    # -- convert: outputs
    ("convert-output-under-a-file", ["convert", "deit_tiny", "--no-pretrained", "-o", "{in}/blocker/c"],
     FAILED, ("cannot write", "blocker/c", "blocker is a file, not a folder"), ()),
    ("convert-output-not-writable", ["convert", "deit_tiny", "--no-pretrained", "-o", "/sys/stvit-contract/c"],
     FAILED, ("cannot write /sys",), ()),
    ("convert-img-size-not-a-multiple-of-the-patch", [*CONVERT, "--img-size", "40"], INVALID,
     ("--img-size 40 is not a multiple", "16-pixel patches"), ()),
    ("convert-output-exists", ["convert", "deit_tiny", "--no-pretrained", "-o", "{in}/nonempty"],
     FAILED, ("already exists", "--force"), ()),
    ("convert-offline", ["convert", "deit_tiny", "-o", "{out}/c"], FAILED,
     ("offline mode is on", "HF_HUB_OFFLINE=1", "--checkpoint"), ()),
    ("convert-hub-unreachable", ["convert", "deit_tiny", "-o", "{out}/c"], FAILED,
     ("cannot connect", "--checkpoint"), ("unreachable",)),
    # -- benchmark (group 2: ranges, devices)
    ("benchmark-rounds-0", [*BENCH, "--rounds", "0"], USAGE, ("--rounds",), ()),
    ("benchmark-rounds-negative", [*BENCH, "--rounds", "-3"], USAGE, ("--rounds",), ()),
    ("benchmark-round-time-0", [*BENCH, "--round-time", "0"], USAGE, ("--round-time",), ()),
    ("benchmark-round-time-negative", [*BENCH, "--round-time", "-1"], USAGE, ("--round-time",), ()),
    ("benchmark-round-time-not-a-number", [*BENCH, "--round-time", "fast"], USAGE, ("--round-time",), ()),
    ("benchmark-threads-0", [*BENCH, "--threads", "0"], USAGE, ("--threads",), ()),
    ("benchmark-batch-0", [*BENCH, "-b", "0"], USAGE, ("--batch-size",), ()),
    ("benchmark-device-tpu", [*BENCH, "--device", "tpu"], USAGE, ("--device", "tpu"), ()),
    ("benchmark-device-malformed", [*BENCH, "--device", "cuda:x"], USAGE, ("--device",), ()),
    ("benchmark-device-cuda-missing", [*BENCH, "--device", "cuda"], INVALID, ("CUDA is not available",),
     (pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA"),)),
    ("benchmark-cuda-graphs-on-cpu", [*BENCH, "--device", "cpu", "--cuda-graphs"], INVALID, ("--cuda-graphs",), ()),
    ("benchmark-dtype-unknown", [*BENCH, "--dtype", "float8"], USAGE, ("--dtype",), ()),
    ("benchmark-tokens-per-window-0", ["benchmark", "swin_tiny", "--tokens-per-window", "0"], USAGE,
     ("--tokens-per-window",), ()),
    ("benchmark-swin-tokens", ["benchmark", "swin_tiny", "--tokens", "7"], INVALID, ("--tokens is for DeiT/ViT",), ()),
    ("benchmark-deit-tokens-per-window", [*BENCH, "--tokens-per-window", "4"], INVALID,
     ("--tokens-per-window is for Swin",), ()),
    ("benchmark-tokens-15", [*BENCH, "--tokens", "15"], INVALID, ("--tokens must be a perfect square",), ()),
    ("benchmark-saved-model-with-tokens", ["benchmark", "{model}", "--tokens", "36"], INVALID,
     ("--tokens", "saved model"), ()),
    ("benchmark-saved-model-with-recovery", ["benchmark", "{model}", "--recovery"], INVALID,
     ("--recovery cannot apply to a saved model",), ()),
    ("benchmark-unknown-model", ["benchmark", "not_a_model"], INVALID, ("unknown model",), ()),
    ("benchmark-hub-offline", ["benchmark", "hf-hub:alice/nothing-here"], FAILED, ("offline mode is on",), ()),
    # -- demo
    ("demo-output-not-writable", ["demo", "-o", "/sys/stvit-contract/demo"], FAILED, ("cannot write /sys",), ()),
    ("demo-output-under-a-file", ["demo", "-o", "{in}/blocker/demo"], FAILED, ("cannot write", "blocker"), ()),
    ("demo-output-not-empty", ["demo", "-o", "{in}/nonempty"], FAILED, ("already exists",), ()),
    ("demo-epochs-0", ["demo", "-o", "{out}/d", "--epochs", "0"], USAGE, ("--epochs",), ()),
    ("demo-tokens-0", ["demo", "-o", "{out}/d", "--tokens", "0"], USAGE, ("--tokens",), ()),
    ("demo-tokens-15", ["demo", "-o", "{out}/d", "--tokens", "15"], INVALID, ("--tokens must be a perfect square",), ()),
    ("demo-tokens-too-many", ["demo", "-o", "{out}/d", "--tokens", "100"], INVALID, ("--tokens 100 exceeds",), ()),
    # -- finetune: the decorators' ranges, then what the command body does
    *[(f"finetune{'-'.join(args[:1])}-{args[1]}", [*FT, *args], USAGE, (args[0],), ()) for args in [
        ["--epochs", "0"], ["--batch-size", "0"], ["--accum-steps", "0"], ["--lr", "0"], ["--lr", "-1"],
        ["--base-lr", "0"], ["--min-lr", "-1e-6"], ["--warmup-epochs", "-1"], ["--weight-decay", "-0.1"],
        ["--layer-decay", "0"], ["--layer-decay", "1.5"], ["--clip-grad", "-1"], ["--drop-path", "1"],
        ["--smoothing", "1.5"], ["--mixup", "-1"], ["--cutmix", "-1"], ["--reprob", "2"], ["--model-ema-decay", "2"],
        ["--distill-alpha", "-0.5"], ["--distill-tau", "0"], ["--workers", "-1"], ["--seed", "-1"],
        ["--checkpoint-every-steps", "-1"], ["--num-classes", "0"], ["--tokens", "-4"], ["--epochs", "ten"],
        ["--device", "tpu"], ["--recipe", "fast"], ["--amp", "fp8"],
    ]],
    ("finetune-missing-data", ["finetune", "-m", "stvit_deit_tiny_patch16_224", "-o", "{out}/ft"], USAGE,
     ("Missing option", "--data"), ()),
    ("finetune-data-not-found", ["finetune", "-m", "stvit_deit_tiny_patch16_224", "--no-pretrained", *TINY, "-d",
                                 "{in}/no-data", "-o", "{out}/ft"], FAILED, ("not found",), ()),
    ("finetune-model-arg-malformed", [*FT, "--model-arg", "img_size"], INVALID, ("key=value",), ()),
    ("finetune-config-missing", [*FT, "--config", "{in}/missing.yaml"], INVALID, ("missing.yaml",), ()),
    ("finetune-resume-missing", [*FT, "--resume", "{in}/missing.pth"], FAILED, ("resume checkpoint",), ()),
    ("finetune-hub-offline", ["finetune", "-m", "hf-hub:alice/nothing-here", *FM, "-o", "{out}/ft"], FAILED,
     ("offline mode is on",), ()),
    ("finetune-device-cuda-missing", [*FT, "--device", "cuda"], INVALID, ("CUDA is not available",),
     (pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA"),)),
    ("finetune-output-not-writable", [*FT[:-1], "/sys/stvit-contract/ft"], FAILED, ("/sys/stvit-contract/ft",), ()),
    ("finetune-output-under-a-file", [*FT[:-1], "{in}/blocker/ft"], FAILED, ("blocker/ft",), ()),
    # (where --tokens is still ignored, one quick epoch runs before the test fails)
    ("finetune-tokens-for-a-converted-model", ["finetune", "-m", "{model}", *FM, "-o", "{out}/ft", "--tokens", "36",
                                               "--epochs", "1", "--workers", "0", "--quiet"],
     INVALID, ("--tokens",), ()),
    # -- eval
    ("eval-batch-0", [*EVAL, "-b", "0"], USAGE, ("--batch-size",), ()),
    ("eval-workers-negative", [*EVAL, "--workers", "-1"], USAGE, ("--workers",), ()),
    ("eval-device-tpu", [*EVAL, "--device", "tpu"], USAGE, ("--device",), ()),
    ("eval-device-cuda-missing", [*EVAL, "--device", "cuda"], INVALID, ("CUDA is not available",),
     (pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA"),)),
    ("eval-amp-unknown", [*EVAL, "--amp", "fp8"], USAGE, ("--amp",), ()),
    ("eval-missing-model", ["eval", "folder", *FM], USAGE, ("Missing option", "--model"), ()),
    ("eval-model-not-found", ["eval", "folder", "-m", "{in}/no-model", *FM], FAILED, ("no-model",), ()),
    ("eval-model-not-a-model", ["eval", "folder", "-m", "{in}/not-a-model", *FM], FAILED, ("config.json",), ()),
    ("eval-hub-offline", ["eval", "folder", "-m", "hf-hub:alice/nothing-here", *FM], FAILED,
     ("offline mode is on",), ()),
    ("eval-data-not-found", ["eval", "folder", "-m", "{model}", "-d", "{in}/no-data"], FAILED, ("not found",), ()),
    ("eval-imagenet-not-synsets", ["eval", "imagenet", "-m", "{model}", *FM], FAILED, ("ImageNet-1k",), ()),
    ("eval-results-file-suffix", [*EVAL, "--results-file", "{out}/r.txt"], INVALID, (".csv or .json",), ()),
    ("eval-results-file-not-writable", [*EVAL, "--results-file", "/sys/stvit-contract.csv"], FAILED,
     ("cannot write /sys",), ()),
    ("eval-results-file-exists", [*EVAL, "--results-file", "{in}/existing.csv"], FAILED,
     ("already exists", "--force"), ()),
    ("eval-results-file-under-a-file", [*EVAL, "--results-file", "{in}/blocker/r.csv"], FAILED,
     ("is a file, not a folder",), ()),
    ("eval-force-without-results-file", [*EVAL, "--force"], INVALID, ("--force applies to --results-file",), ()),
    ("eval-data-is-a-file", ["eval", "folder", "-m", "{model}", "-d", "{img}"], FAILED, ("is a file",), ()),
    ("eval-unknown-subcommand", ["eval", "cifar"], USAGE, ("No such command",), ()),
    # -- vis
    ("vis-not-an-stvit-model", ["vis", "{in}/plain-deit", "{in}/image.png", "-o", "{out}/vis"], INVALID,
     ("not an STViT model",), ()),
    ("vis-layer-out-of-range", [*VIS, "--layer", "2"], INVALID, ("--layer 2 is out of range", "0 to 1"), ()),
    ("vis-layer-negative", [*VIS, "--layer", "-1"], USAGE, ("--layer", "x>=0"), ()),
    ("vis-unit-without-units", [*VIS, "--unit", "0"], INVALID, ("--unit 0 cannot apply",), ()),
    ("vis-unit-negative", [*VIS, "--unit", "-1"], USAGE, ("--unit",), ()),
    ("vis-output-not-writable", [*VIS[:-1], "/sys/stvit-contract/vis"], FAILED, ("cannot write /sys",), ()),
    ("vis-output-under-a-file", [*VIS[:-1], "{in}/blocker/vis"], FAILED, ("cannot write", "blocker"), ()),
    ("vis-output-is-a-file", [*VIS[:-1], "{in}/blocker"], USAGE, ("--output", "blocker"), ()),
    ("vis-missing-output", VIS[:-2], USAGE, ("Missing option", "--output"), ()),
    ("vis-missing-images", ["vis", "{model}", "-o", "{out}/vis"], USAGE, ("Missing argument", "IMAGE_OR_DIR"), ()),
    ("vis-unreadable-image", ["vis", "{model}", "{in}/random.pth", "-o", "{out}/vis"], FAILED,
     ("cannot read image", "random.pth"), ()),
    ("vis-missing-image", ["vis", "{model}", "{in}/nothing.png", "-o", "{out}/vis"], FAILED,
     ("cannot read", "nothing.png", "No such file"), ()),
    ("vis-folder-without-images", ["vis", "{model}", "{in}/nonempty", "-o", "{out}/vis"], FAILED,
     ("no images in", "nonempty"), ()),
    ("vis-fill-unknown", [*VIS, "--fill", "random"], USAGE, ("--fill",), ()),
    ("vis-device-tpu", [*VIS, "--device", "tpu"], USAGE, ("--device",), ()),
    ("vis-device-cuda-missing", [*VIS, "--device", "cuda"], INVALID, ("CUDA is not available",),
     (pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA"),)),
    ("vis-tokens-for-a-saved-model", [*VIS, "--tokens", "16"], INVALID, ("--tokens 16 cannot apply to a saved model",), ()),
    ("vis-swin-tokens", ["vis", "swin_tiny", "{in}/image.png", "-o", "{out}/vis", "--tokens", "16"], INVALID,
     ("--tokens is for DeiT/ViT",), ()),
    ("vis-deit-tokens-per-window", ["vis", "deit_tiny", "{in}/image.png", "-o", "{out}/vis", "--tokens-per-window",
                                    "9"], INVALID, ("--tokens-per-window is for Swin",), ()),
    ("vis-hub-offline", ["vis", "hf-hub:alice/nothing-here", "{in}/image.png", "-o", "{out}/vis"], FAILED,
     ("offline mode is on",), ()),
    ("vis-source-offline", ["vis", "deit_tiny", "{in}/image.png", "-o", "{out}/vis"], FAILED,
     ("offline mode is on", "--checkpoint FILE", "--no-pretrained"), ()),
    ("vis-tokens-15", ["vis", "deit_tiny", "{in}/image.png", "-o", "{out}/vis", "--no-pretrained", "--tokens", "15"],
     INVALID, ("--tokens must be a perfect square",), ()),
    ("vis-checkpoint-for-a-saved-model", [*VIS, "--checkpoint", "{weights}"], INVALID, ("--checkpoint",), ()),
    ("vis-checkpoint-corrupt", ["vis", "deit_tiny", "{in}/image.png", "-o", "{out}/vis", "--checkpoint",
                                "{in}/random.pth"], FAILED, ("not a PyTorch checkpoint (or corrupt)",), ()),
    # -- hub
    ("push-not-a-model", ["push-to-hub", "{in}/not-a-model", "alice/x"], FAILED, ("not a model directory",), ()),
    ("push-missing-directory", ["push-to-hub", "{in}/no-model", "alice/x"], FAILED, ("not a directory",), ()),
    ("push-no-token", ["push-to-hub", "{model}", "alice/x"], FAILED, ("needs a Hugging Face token",), ()),
    ("push-pr-and-revision", ["push-to-hub", "{model}", "alice/x", "--create-pr", "--revision", "dev"], INVALID,
     ("--create-pr",), ()),
    ("push-missing-repo", ["push-to-hub", "{model}"], USAGE, ("Missing argument 'REPO_ID'",), ()),
    ("pull-offline", ["pull", "alice/x"], FAILED, ("offline mode is on", "HF_HUB_OFFLINE=1"), ()),
    ("pull-unreachable", ["pull", "alice/x", "-o", "{out}/p"], FAILED, ("cannot connect",), ("unreachable",)),
    ("pull-two-revisions", ["pull", "alice/x@v1", "--revision", "v2"], INVALID, ("two revisions", "--revision v2"), ()),
    # -- empty arguments (an unset shell variable) name nothing: not the current directory, not main
    ("empty-data", [*EVAL[:-1], ""], USAGE, ("the value of -d is empty",), ()),
    ("empty-output", ["convert", "deit_tiny", "--no-pretrained", "--output", ""], USAGE,
     ("the value of --output is empty",), ()),
    ("empty-output-equals", ["export", "{model}", "--output="], USAGE, ("the value of --output is empty",), ()),
    ("empty-checkpoint", ["convert", "deit_tiny", "--checkpoint", " ", "-o", "{out}/c"], USAGE,
     ("the value of --checkpoint is empty",), ()),
    ("empty-image", [*PREDICT, ""], USAGE, ("an argument is empty",), ()),
    ("export-hf-hub-empty-revision", ["export", "hf-hub:alice/x@", "-o", "{out}/m.onnx"], INVALID,
     ("empty revision", "nothing after @"), ()),
    ("eval-hf-hub-empty-revision", ["eval", "folder", "-m", "hf-hub:alice/x@", *FM], INVALID, ("empty revision",), ()),
    # -- benchmark: onnxruntime and batch sizes
    ("benchmark-runtime-unknown", [*BENCH, "--runtime", "tensorrt"], USAGE, ("--runtime",), ()),
    ("benchmark-onnxruntime-train", [*BENCH, "--runtime", "onnxruntime", "--bench", "train"], INVALID,
     ("--bench train", "--runtime onnxruntime"), ()),
    ("benchmark-onnxruntime-compile", [*BENCH, "--runtime", "onnxruntime", "--compile"], INVALID, ("--compile",), ()),
    ("benchmark-onnxruntime-dtype", [*BENCH, "--runtime", "onnxruntime", "--dtype", "bfloat16"], INVALID,
     ("--dtype bfloat16",), ()),
    ("benchmark-onnxruntime-missing", [*BENCH, "--runtime", "onnxruntime"], FAILED,
     ("onnxruntime", "pip install 'stvit[export]'"), ("no-onnxruntime",)),
    ("benchmark-onnxruntime-cuda-missing", [*BENCH, "--runtime", "onnxruntime", "--device", "cuda"], INVALID,
     ("CUDAExecutionProvider",), (pytest.mark.skipif(HAS_ORT_CUDA, reason="onnxruntime has CUDA here"),)),
    ("benchmark-batch-sizes-malformed", [*SWEEP, "--batch-sizes", "1,x"], USAGE, ("--batch-sizes",), ()),
    ("benchmark-batch-sizes-0", [*SWEEP, "--batch-sizes", "0,8"], USAGE, ("--batch-sizes", "at least 1"), ()),
    ("benchmark-batch-sizes-repeated", [*SWEEP, "--batch-sizes", "8,8"], USAGE, ("repeats",), ()),
    ("benchmark-batch-size-and-sizes", [*BENCH, "--batch-sizes", "1,2"], INVALID, ("exclude",), ()),
    ("benchmark-plot-without-batch-sizes", [*BENCH, "--plot", "{out}/p.png"], INVALID, ("--plot needs",), ()),
    ("benchmark-plot-matplotlib-missing", [*SWEEP, "--batch-sizes", "1", "--plot", "{out}/p.png"], FAILED,
     ("matplotlib", "pip install 'stvit[plot]'"), ("no-matplotlib",)),
    ("benchmark-plot-not-writable", [*SWEEP, "--batch-sizes", "1", "--plot", "/sys/stvit-contract.png"], FAILED,
     ("cannot write /sys",), ()),
    ("benchmark-plot-not-png", [*SWEEP, "--batch-sizes", "1", "--plot", "{out}/p.txt"], INVALID, (".png",), ()),
    ("benchmark-plot-exists", [*SWEEP, "--batch-sizes", "1", "--plot", "{in}/existing.png"], FAILED,
     ("already exists", "--force"), ()),
    ("benchmark-force-without-plot", [*BENCH, "--force"], INVALID, ("--force applies to --plot",), ()),
    ("benchmark-plot-both", [*SWEEP, "--batch-sizes", "1", "--bench", "both", "--plot", "{out}/p.png"], INVALID,
     ("--plot draws one benchmark",), ()),
    ("benchmark-round-time-inf", [*BENCH, "--round-time", "inf"], USAGE, ("--round-time", "not a finite number"), ()),
    ("benchmark-round-time-nan", [*BENCH, "--round-time", "nan"], USAGE, ("--round-time", "not a finite number"), ()),
    ("benchmark-recovery-swin", ["benchmark", "swin_tiny", "--recovery", "-b", "1", "--rounds", "1", "--device", "cpu"],
     INVALID, ("--recovery is for DeiT/ViT",), ()),
    ("benchmark-out-of-memory", ["benchmark", "deit_tiny", "-b", "20000000", "--rounds", "1", "--device", "cpu"],
     FAILED, ("out of memory", "smaller batch size"), ()),
    # -- export
    ("export-unknown-format", [*EXPORT, "--format", "tflite"], USAGE, ("--format", "tflite"), ()),
    ("export-pt2-named-onnx", [*EXPORT, "--format", "pt2"], INVALID, ("--format pt2 writes a .pt2 file",), ()),
    ("export-onnx-named-pt2", ["export", "{model}", "-o", "{out}/m.pt2"], INVALID, ("writes a .onnx file",), ()),
    ("export-missing-output", ["export", "{model}"], USAGE, ("Missing option", "--output"), ()),
    ("export-output-exists", ["export", "{model}", "-o", "{in}/existing.onnx"], FAILED, ("already exists", "--force"),
     ()),
    ("export-output-is-a-directory", ["export", "{model}", "-o", "{in}/nonempty"], FAILED, ("is a directory",), ()),
    ("export-output-not-writable", ["export", "{model}", "-o", "/sys/stvit-contract.onnx"], FAILED,
     ("cannot write /sys",), ()),
    ("export-output-folder-missing", ["export", "{model}", "-o", "{out}/no/m.onnx"], FAILED, ("does not exist",), ()),
    ("export-not-stvit-name", ["export", "deit_tiny_patch16_224", "-o", "{out}/m.onnx"], INVALID,
     ("not an STViT model",), ()),
    ("export-not-stvit-directory", ["export", "{in}/plain-deit", "-o", "{out}/m.onnx"], INVALID,
     ("not an STViT model", "deit_tiny_patch16_224"), ()),
    ("export-onnxruntime-missing", EXPORT, FAILED, ("onnxruntime", "pip install 'stvit[export]'"), ("no-onnxruntime",)),
    ("export-features-not-recovery", [*EXPORT, "--features"], INVALID, ("--features", "STViT-R"), ()),
    ("export-tokens-for-a-saved-model", [*EXPORT, "--tokens", "16"], INVALID, ("--tokens 16", "saved model"), ()),
    ("export-no-pretrained-for-a-saved-model", [*EXPORT, "--no-pretrained"], INVALID, ("--no-pretrained",), ()),
    ("export-batch-and-dynamic", [*EXPORT, "-b", "2", "--dynamic-batch"], INVALID, ("exclude",), ()),
    ("export-batch-0", [*EXPORT, "-b", "0"], USAGE, ("--batch-size",), ()),
    ("export-opset-for-pt2", ["export", "{model}", "--format", "pt2", "--opset", "18", "-o", "{out}/m.pt2"], INVALID,
     ("--opset",), ()),
    ("export-opset-0", [*EXPORT, "--opset", "0"], USAGE, ("--opset",), ()),
    ("export-unknown-model", ["export", "not_a_model", "-o", "{out}/m.onnx"], INVALID, ("unknown model",), ()),
    ("export-swin-tokens", ["export", "swin_tiny", "--tokens", "4", "-o", "{out}/m.onnx"], INVALID,
     ("--tokens is for DeiT/ViT",), ()),
    ("export-hub-offline", ["export", "hf-hub:alice/nothing-here", "-o", "{out}/m.onnx"], FAILED,
     ("offline mode is on",), ()),
    # -- predict
    ("predict-missing-images", ["predict", "{model}"], USAGE, ("Missing argument",), ()),
    ("predict-top-k-0", [*PREDICT, "--top-k", "0"], USAGE, ("--top-k",), ()),
    ("predict-top-k-too-many", [*PREDICT, "--top-k", "11"], INVALID, ("--top-k 11", "10 classes"), ()),
    ("predict-batch-0", [*PREDICT, "-b", "0"], USAGE, ("--batch-size",), ()),
    ("predict-device-tpu", [*PREDICT, "--device", "tpu"], USAGE, ("--device",), ()),
    ("predict-unreadable-image", ["predict", "{model}", "{in}/bad.png"], FAILED, ("cannot read image", "bad.png"), ()),
    ("predict-missing-image", ["predict", "{model}", "{in}/no-such.png"], FAILED, ("cannot read", "no-such.png"), ()),
    ("predict-folder-without-images", ["predict", "{model}", "{in}/not-a-model"], FAILED, ("no images in",), ()),
    ("predict-not-stvit", ["predict", "{in}/plain-deit", "{img}"], INVALID, ("not an STViT model",), ()),
    ("predict-onnx-missing", ["predict", "{in}/none.onnx", "{img}"], FAILED, ("none.onnx",), ()),
    ("predict-onnx-not-from-stvit", ["predict", "{in}/plain.onnx", "{img}"], FAILED,
     ("no stvit preprocessing metadata",), ()),
    ("predict-onnx-with-tokens", ["predict", "{in}/plain.onnx", "{img}", "--tokens", "4"], INVALID,
     ("--tokens 4", "ONNX file"), ()),
    ("predict-onnxruntime-missing", ["predict", "{in}/plain.onnx", "{img}"], FAILED,
     ("onnxruntime", "pip install 'stvit[export]'"), ("no-onnxruntime",)),
    # -- env
    ("env-unknown-option", ["env", "--verbose"], USAGE, ("No such option",), ()),
]


def _params():
    for case_id, args, code, fragments, extra in CATALOGUE:
        marks = [m for m in extra if not isinstance(m, str)]
        yield pytest.param(args, code, fragments, {m for m in extra if isinstance(m, str)}, id=case_id, marks=marks)


@pytest.fixture
def hub_offline(monkeypatch, tmp_path_factory):
    """No network: offline mode, an empty Hugging Face cache and no token (in-process, as huggingface_hub reads
    its environment at import)."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hf-cache")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    return constants


@pytest.mark.parametrize("args, code, fragments, flags", list(_params()))
def test_bad_input_is_one_line_and_leaves_nothing(args, code, fragments, flags, inputs, hub_offline,
                                                  tmp_path, monkeypatch):
    if "unreachable" in flags:
        monkeypatch.setattr(hub_offline, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hub_offline, "ENDPOINT", _closed_port_url())
    for module in ("onnxruntime", "matplotlib"):
        if f"no-{module}" in flags:  # as if the extra were not installed: importing it fails
            monkeypatch.setitem(sys.modules, module, None)
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    out.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    values = dict(inputs, out=str(out))
    argv = [a.format(**values) for a in args]
    before = (_tree(out), _tree(cwd), sorted(os.listdir(inputs["in"])))

    result = CliRunner().invoke(cli, argv, prog_name="stvit")

    assert isinstance(result.exception, SystemExit) or result.exception is None, repr(result.exception)
    lines = result.stderr.splitlines()
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "weights_only" not in lines[0], lines[0]  # never torch's advice to turn safe loading off
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert (_tree(out), _tree(cwd), sorted(os.listdir(inputs["in"]))) == before, "something was left behind"


# options whose absence means "none of this" (no file to read or write): there is no default to show
NOTHING_WHEN_ABSENT = {"checkpoint", "config_file", "resume", "results_file", "plot"}


def _all_commands() -> List[Tuple[str, click.Command]]:
    found = []

    def walk(prefix: str, command: click.Command) -> None:
        found.append((prefix, command))
        for name, sub in getattr(command, "commands", {}).items():
            walk(f"{prefix} {name}".strip(), sub)

    walk("", cli)
    return found


@pytest.mark.parametrize("path, command", _all_commands(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_has_help_and_a_shown_default(path, command):
    for param in command.params:
        if not isinstance(param, click.Option) or param.name in ("help", "version"):
            continue
        assert param.help, f"stvit {path} {param.opts[0]}: no help text"
        takes_value = not param.is_flag and not param.count
        if takes_value and not param.required and not param.multiple and param.name not in NOTHING_WHEN_ABSENT:
            assert param.show_default, f"stvit {path} {param.opts[0]}: no shown default"


def test_usage_errors_are_one_line_with_exit_code_2_in_a_real_process(tmp_path):
    """What a shell sees (not the test runner): one line, code 2, and torch was never imported for it."""
    from .conftest import run_cli

    proc = run_cli("benchmark", "deit_tiny", "--rounds", "0", cwd=tmp_path, fresh_process=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "Error: Invalid value for '--rounds': 0 is not in the range x>=1. (see 'stvit benchmark --help')"]
    assert proc.stdout == "" and os.listdir(tmp_path) == []


def test_the_bare_command_prints_its_help(tmp_path):
    """`stvit` (or `stvit eval`) alone asks for the help: click raises it as a usage error, which used to come out
    as the whole help squeezed into one 'Error:' line with exit code 2."""
    from .conftest import run_cli

    for args in ((), ("eval",)):
        proc = run_cli(*args, cwd=tmp_path)
        assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        assert proc.stdout.startswith(f"Usage: stvit {' '.join(args)}".rstrip() + " [OPTIONS] COMMAND")
        assert "Commands:" in proc.stdout and "\n" in proc.stdout.strip()


def _shown_value(text: str):
    text = text.split("=")[0].split(",")[0].strip()
    if text == "off":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def test_finetune_shows_the_trainer_defaults_and_what_the_paper_recipe_changes():
    """The help of `stvit finetune` states TrainConfig's defaults and the paper recipe's, and stays in step."""
    import dataclasses

    from stvit_core.train import RECIPES, TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    checked = 0
    for param in cli.commands["finetune"].params:
        if param.name not in defaults or not isinstance(param.show_default, str) or param.name in ("device", "lr"):
            continue
        own, _, paper = param.show_default.partition("; paper:")
        default = defaults[param.name]
        expected = None if default is None or default is False else (float(default) if isinstance(default, (int, float))
                                                            else default)
        assert _shown_value(own) == expected, (param.name, param.show_default, default)
        in_paper = RECIPES["paper"].get(param.name, default)
        if in_paper != default:
            assert paper, f"--{param.name}: the paper recipe sets {in_paper}; the help must say so"
            assert _shown_value(paper) == (float(in_paper) if isinstance(in_paper, (int, float)) else in_paper)
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize("command", [["predict", "{m}", "{img}"], ["export", "{m}", "-o", "x.onnx"],
                                     ["benchmark", "{m}", "--rounds", "1"], ["vis", "{m}", "{img}", "-o", "v"],
                                     ["eval", "folder", "-m", "{m}", *FM]],
                         ids=lambda c: c[0])
def test_a_folder_named_without_a_separator_is_reported_as_a_model_directory(command, inputs, tmp_path, monkeypatch):
    """`stvit predict m2 ...` where ./m2 has no config.json (or does not exist, spelled `m3/`) says so, whatever
    the command: not 'unknown model' (exit 2) for some commands and 'not a model directory' (1) for others."""
    (tmp_path / "m2").mkdir()
    (tmp_path / "m2" / "model.safetensors").write_bytes(b"weights without their config.json")
    monkeypatch.chdir(tmp_path)
    for spec, fragment in (("m2", "m2 is not a model directory: config.json is missing"), ("m3/", "m3 does not exist")):
        before = _tree(tmp_path)
        result = CliRunner().invoke(cli, [a.format(m=spec, **inputs) for a in command], prog_name="stvit")
        lines = result.stderr.splitlines()
        assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], (result.exit_code, result.stderr)
        assert _tree(tmp_path) == before
