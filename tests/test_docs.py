"""The user docs: docs/index.md's Python blocks run as written, and README.md and docs/index.md link every page.

Other pages' blocks run in the tests of what they document (training.md and evaluation.md in test_train.py,
deploy.md in test_export_cli.py, visualise.md in test_vis.py, dense-tasks.md's examples in test_detection.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.train_utils import doc_blocks

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
# the pages written for users (benchmarks*.md and architecture.md have their own checks)
USER_DOCS = [ROOT / "README.md", ROOT / "CHANGELOG.md"] + [DOCS / f"{name}.md" for name in (
    "index", "cli", "training", "evaluation", "deploy", "visualise", "hub", "dense-tasks", "benchmarks-training")]


@pytest.mark.slow  # builds and converts four models, counts FLOPs
def test_index_python_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = [text for language, text in doc_blocks(DOCS / "index.md") if language == "python"]
    assert len(blocks) >= 2
    for text in blocks:
        exec(compile(text, "docs/index.md (python block)", "exec"), {"__name__": "__doc__"})
    assert (tmp_path / "my-stvit-deit-tiny" / "config.json").is_file()
    assert (tmp_path / "stvit-deit-tiny-t16" / "model.safetensors").is_file()


@pytest.mark.parametrize("page", ["README.md", "docs/index.md"])
def test_every_docs_page_is_linked(page):
    text = (ROOT / page).read_text()
    prefix = "docs/" if page == "README.md" else ""
    missing = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "index.md" or page == "README.md"
               if f"]({prefix}{p.name})" not in text]
    assert not missing, f"{page} does not link {missing}"


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.name)
def test_links_between_pages_resolve(path):
    for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", path.read_text()):
        assert (path.parent / target).is_file(), f"{path.name} links {target}, which does not exist"


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.name)
def test_docs_speak_to_users(path):
    """No file outside the repository, no second results folder, no project-tracker headings."""
    text = path.read_text()
    assert "SPEC.md" not in text
    assert not re.search(r"(?<![\w/.-])results/", text.replace("benchmarks/results/", "")), \
        f"{path.name} names a results/ folder other than benchmarks/results/"
    assert not re.search(r"^#+ .*\bissue\b", text, re.M | re.I), f"{path.name} has an issue heading"
