"""The shape of the package (docs/architecture.md): imports at the top of each module of stvit_core, except the
optional extras, which are imported where they are used so that the package works without them. The layers
themselves are checked by import-linter (``lint-imports``, contracts in pyproject.toml)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stvit_core"
# pip install "stvit[export]", "stvit[plot]", "stvit[detection]", "stvit[segmentation]"; torchvision's detection
# models and yacs (a release checkpoint's config class, never imported by stvit) are not needed to import stvit
OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "matplotlib", "pycocotools", "segmentation_models_pytorch",
            "torchvision.models.detection", "torchvision.ops")


def _function_imports(path: Path):
    tree = ast.parse(path.read_text())
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Import):
                yield from ((node.lineno, alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                yield node.lineno, "." * node.level + (node.module or "")


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_are_at_the_top(path):
    late = [f"{path.name}:{line} imports {module}" for line, module in _function_imports(path)
            if not module.startswith(OPTIONAL)]
    assert not late, "imports inside functions (move them to the top of the module): " + "; ".join(late)
