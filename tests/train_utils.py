"""Shared helpers for the data/train/eval tests: small real datasets cut from the embedded subset, tiny models."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch

import stvit_core  # noqa: F401  (registers the STViT models)
from stvit_core.data import embedded_dataset_path, folder_classes

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(img_size=28, patch_size=4, embed_dim=48, depth=6, num_heads=2, num_classes=10)


def make_subset(dest: Path, train_per_class: int, val_per_class: int, classes: Optional[Sequence[str]] = None) -> Path:
    """Copy the first N images per class of the embedded Fashion-MNIST subset into dest/{train,val}."""
    src = embedded_dataset_path()
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for name in classes or folder_classes(src / split):
            out = dest / split / name
            out.mkdir(parents=True)
            for f in sorted((src / split / name).iterdir())[:n]:
                shutil.copyfile(f, out / f.name)
    return dest


def tiny_stvit(tokens: int = 4, **kw) -> torch.nn.Module:
    """An STViT-DeiT with a tiny width: 2 image blocks, the 2-layer generator, 2 semantic blocks."""
    args = dict(TINY, num_semantic_tokens=tokens, num_image_blocks=2)
    args.update(kw)
    return timm.create_model("stvit_deit_tiny_patch16_224", **args)


def tiny_deit(**kw) -> torch.nn.Module:
    args = dict(TINY)
    args.update(kw)
    return timm.create_model("deit_tiny_patch16_224", **args)


def converted_model_dir(path: Path, tokens: int = 4) -> Path:
    """A tiny DeiT converted to STViT and saved the way ``stvit convert`` saves it (``stvit`` metadata included)."""
    from stvit_core import save_model
    from stvit_core.convert import conversion_metadata, convert_model

    torch.manual_seed(0)
    source = tiny_deit()
    model = convert_model(source, num_semantic_tokens=tokens, num_image_blocks=2)
    save_model(model, path, metadata=conversion_metadata(source, model, source_name="deit_tiny_patch16_224"))
    return path


def unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create anything in (root ignores file modes, so root gets sysfs)."""
    import pytest

    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    probe = Path("/sys/stvit-write-probe")
    try:
        probe.mkdir()
    except OSError:
        return Path("/sys")
    probe.rmdir()
    pytest.skip("no folder on this machine refuses writes to root")


def env() -> Dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return e


def cli(args: List[str], timeout: float = 300, fresh_process: bool = False):
    """``stvit ARGS`` from the repository root with :func:`env`: in this process unless ``fresh_process``."""
    return run_cli(*args, env=env(), exact_env=True, cwd=ROOT, timeout=timeout, fresh_process=fresh_process)


def cli_in_process(args: List[str]):
    """``stvit ARGS`` in this process, in the current directory and environment."""
    return run_cli(*args, env=dict(os.environ), exact_env=True)


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def doc_blocks(path: Path) -> List[Tuple[str, str]]:
    """The fenced code blocks of a Markdown file, as (language, text), in order."""
    import re

    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S)]


def run_doc_blocks(path: Path) -> None:
    """Run every code block of ``path`` in the current directory: ``bash`` blocks of ``stvit`` commands,
    ``console`` transcripts (output compared with every number masked) and ``python`` blocks."""
    import re
    import shlex

    def masked(text: str) -> List[str]:
        return [re.sub(r"\d+(\.\d+)?", "N", line.rstrip()) for line in text.strip().splitlines()]

    for language, text in doc_blocks(path):
        if language == "python":
            exec(compile(text, f"{path.name} (python block)", "exec"), {"__name__": "__doc__"})
        elif language == "bash":
            for command in text.replace("\\\n", " ").strip().splitlines():
                words = shlex.split(command, comments=True)
                assert words[:1] == ["stvit"], f"{path.name}: cannot run {command!r} in a test"
                result = cli_in_process(words[1:])
                assert result.returncode == 0, f"{command}\n{result.stderr}"
        elif language == "console":
            for chunk in text.split("$ ")[1:]:
                command, _, expected = chunk.partition("\n")
                result = cli_in_process(shlex.split(command)[1:])
                assert result.returncode == 0, f"{command}\n{result.stderr}"
                assert masked(result.stdout) == masked(expected), f"{command}\n{result.stdout}"
        else:
            raise AssertionError(f"{path.name}: a {language or 'plain'} code block that no test runs")
