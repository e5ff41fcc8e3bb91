"""Plain arguments (paths, options that exclude each other) are checked before stvit_core, and so torch, is
imported: every command fails on them in a fraction of a second, with the line and exit code the library gives
for the same argument. The import is asserted, never the wall time."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from stvit_cli.commands import _checks
from stvit_core.checkpoint import load_state_dict_file
from stvit_core.data import resolve_data_root, split_folder
from stvit_core.errors import CheckpointError, DataError, InvalidArgumentError, OutputExistsError, StvitError
from stvit_core.files import atomic_directory, check_output_path
from stvit_core.hub import push_to_hub
from stvit_core.images import find_images
from stvit_core.predict import load_classifier
from stvit_core.vis import check_vis_output

# Each command in one fresh interpreter, in process (click's runner): exit code, stderr, and whether anything
# imported torch or stvit_core on the way.
_RUNNER = textwrap.dedent("""
    import json, sys
    from click.testing import CliRunner
    from stvit_cli.main import cli

    results = []
    for args in json.loads(sys.argv[1]):
        r = CliRunner().invoke(cli, args)
        results.append({"args": args, "code": r.exit_code, "stderr": r.stderr,
                        "exception": None if isinstance(r.exception, SystemExit) else repr(r.exception)})
    print(json.dumps({"results": results, "imported": sorted(m for m in sys.modules
                                                               if m.split(".")[0] in ("torch", "timm", "stvit_core"))}))
""")


def _run_fresh(cases):
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps([args for args, _, _ in cases])],
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout)


@pytest.fixture()
def paths(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.png").write_bytes(b"x")
    for name in ("exists.csv", "exists.onnx", "exists.png", "a-file"):
        (tmp_path / name).write_text("x")
    (tmp_path / "model").mkdir()
    return tmp_path


def test_every_command_checks_plain_arguments_before_importing_torch(paths):
    p = lambda name: str(paths / name)  # noqa: E731
    cases = [
        (["eval", "imagenet", "-m", "x", "-d", p("nonexistent")], 1, f"data folder not found: {p('nonexistent')}"),
        (["eval", "folder", "-m", "x", "-d", p("a-file")], 1, f"{p('a-file')} is a file: the data is a folder"),
        (["eval", "folder", "-m", "x", "-d", "fashion-mnist", "--results-file", p("exists.csv")], 1,
         f"{p('exists.csv')} already exists (use --force to overwrite)"),
        (["eval", "folder", "-m", "x", "-d", "fashion-mnist", "--results-file", p("r.txt")], 2, "must end in .csv"),
        (["predict", p("none.onnx"), p("full")], 1, f"cannot read {p('none.onnx')}: No such file"),
        (["predict", p("model"), p("no.png")], 1, f"cannot read {p('no.png')}: No such file or directory"),
        (["vis", p("model"), p("full"), "-o", p("full")], 1, f"{p('full')} already exists (use --force"),
        (["vis", p("model"), p("no.png"), "-o", p("vis")], 1, f"cannot read {p('no.png')}: No such file"),
        (["export", p("model"), "-o", p("exists.onnx")], 1, f"{p('exists.onnx')} already exists (use --force"),
        (["export", p("model"), "-o", p("m.onnx"), "-b", "1", "--dynamic-batch"], 2,
         "--batch-size and --dynamic-batch exclude each other"),
        (["export", p("model"), "-o", p("m.pt2")], 2, "--format onnx writes a .onnx file, not m.pt2"),
        (["export", p("model"), "-o", p("out") + "/"], 2, "so it names a folder"),
        (["benchmark", "deit_tiny", "--threads", "100000"], 2, "100000 is more than the"),
        (["benchmark", "deit_tiny", "--batch-sizes", "1", "--plot", p("exists.png")], 1,
         f"{p('exists.png')} already exists (use --force"),
        (["benchmark", "deit_tiny", "--plot", p("p.png")], 2, "--plot needs --batch-sizes"),
        (["benchmark", "deit_tiny", "--force"], 2, "--force applies to --plot only"),
        (["convert", "deit_tiny", "-o", p("full")], 1, f"{p('full')} already exists (use --force to overwrite)"),
        (["convert", "deit_tiny", "--checkpoint", p("none.pth"), "-o", p("c")], 1,
         f"checkpoint not found: {p('none.pth')}"),
        (["convert", "deit_tiny", "--checkpoint", p("a-file"), "--no-pretrained"], 2,
         "--checkpoint and --no-pretrained exclude each other"),
        (["push-to-hub", p("none"), "alice/x"], 1, f"{p('none')} is not a directory"),
        (["pull", "alice/x", "-o", p("full")], 1, f"{p('full')} already exists (use --force to overwrite)"),
        (["pull", "alice/x", "--force"], 2, "--force applies to --output only"),
        (["demo", "-o", p("full")], 1, f"{p('full')} already exists (use --force to overwrite)"),
        (["finetune", "-m", "deit_tiny", "-d", p("nonexistent"), "-o", p("ft")], 1,
         f"data folder not found: {p('nonexistent')}"),
        (["finetune", "-m", "deit_tiny", "-d", "fashion-mnist", "-o", p("ft"), "--checkpoint", p("none.pth")], 1,
         f"checkpoint not found: {p('none.pth')}"),
    ]
    report = _run_fresh(cases)
    for (args, code, fragment), result in zip(cases, report["results"]):
        lines = result["stderr"].splitlines()
        assert result["exception"] is None, (args, result)
        assert result["code"] == code and len(lines) == 1 and lines[0].startswith("Error: "), (args, result)
        assert fragment in lines[0], (args, lines[0])
    assert report["imported"] == []


def test_a_missing_data_folder_fails_without_importing_torch():
    """``stvit eval imagenet -d /nonexistent`` as a user runs it: a process of its own, its imports listed."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "stvit_cli", "eval", "imagenet", "-m", "x",
                           "-d", "/nonexistent"], capture_output=True, text=True, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 1 and errors == ["Error: data folder not found: /nonexistent"], proc.stderr[-2000:]
    assert "click" in imported and not {"torch", "timm", "stvit_core"} & imported


def test_several_missing_images_are_each_named(paths):
    report = _run_fresh([(["predict", str(paths / "model"), str(paths / "a.png"), str(paths / "b")], 1, "")])
    result = report["results"][0]
    assert result["code"] == 1 and result["stderr"].splitlines() == [
        f"Error: cannot read {paths / 'a.png'}: No such file or directory",
        f"Error: cannot read {paths / 'b'}: No such file or directory"]


# --- the early line is the library's line ------------------------------------------------------------------
def _library_message(call, *exceptions):
    with pytest.raises(exceptions) as info:
        call()
    return str(info.value), info.value.exit_code


def _early_message(call):
    with pytest.raises(_checks.EarlyError) as info:
        call()
    return info.value.message, info.value.exit_code


def test_data_folder_lines_are_the_library_lines(paths):
    (paths / "train-only" / "train" / "cat").mkdir(parents=True)
    (paths / "val-only" / "validation" / "cat").mkdir(parents=True)
    for spec, split in ((str(paths / "nonexistent"), "val"), (str(paths / "a-file"), "val"),
                        (str(paths / "nonexistent") + "/", "val"), (str(paths / "train-only"), "val"),
                        (str(paths / "val-only"), "train")):
        assert _early_message(lambda: _checks.check_data_folder(spec, split)) == _library_message(
            lambda: split_folder(resolve_data_root(spec), split), DataError)
    for spec, split in (("fashion-mnist", "val"), (str(paths / "val-only"), "val"), (str(paths / "full"), "val")):
        _checks.check_data_folder(spec, split)  # the embedded set, a split folder, class folders: as the library
        split_folder(resolve_data_root(spec), split)


def test_output_file_lines_are_the_library_lines(paths):
    for output in (paths / "exists.onnx", paths / "full", str(paths / "out") + "/"):
        assert _early_message(lambda: _checks.check_output_file(output, force=False)) == _library_message(
            lambda: check_output_path(output, force=False), OutputExistsError, InvalidArgumentError)
    _checks.check_output_file(paths / "exists.onnx", force=True)


def test_output_folder_lines_are_the_library_lines(paths):
    def enter_at(path, force=False):
        with atomic_directory(path, force=force):
            pass

    assert _early_message(lambda: _checks.check_output_dir(paths / "full", force=False)) == _library_message(
        lambda: enter_at(paths / "full"), OutputExistsError)
    early = _early_message(lambda: _checks.check_figures_folder(paths / "full", force=False))
    assert early == _library_message(lambda: check_vis_output(paths / "full"), OutputExistsError)
    _checks.check_figures_folder(paths / "model", force=False)  # empty: used as it is
    _checks.check_figures_folder(paths / "a-file", force=False)  # not a folder: the library says what is wrong
    _checks.check_output_dir(paths / "full", force=True)
    (paths / "dangling").symlink_to(paths / "nowhere")  # something in the way, for the library too
    for check, library in ((_checks.check_output_dir, enter_at), (_checks.check_output_file, check_output_path)):
        assert _early_message(lambda: check(paths / "dangling", force=False)) == _library_message(
            lambda: library(paths / "dangling"), OutputExistsError)


def test_input_lines_are_the_library_lines(paths):
    assert _early_message(lambda: _checks.check_checkpoint_file(paths / "none.pth")) == _library_message(
        lambda: load_state_dict_file(paths / "none.pth"), CheckpointError)
    assert find_images([paths / "none.png"])[1][0]["error"] == _checks.missing_path_message(paths / "none.png")
    assert str(_library_message(lambda: load_classifier(str(paths / "none.onnx")), DataError)[0]) == (
        f"cannot read {paths / 'none.onnx'}: No such file")
    assert _library_message(lambda: push_to_hub(paths / "none", "alice/x"), StvitError)[0] == (
        f"{paths / 'none'} is not a directory")
