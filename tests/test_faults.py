"""What the world does to a run: a full disk, SIGTERM, two writers of one output, odd paths, --quiet, a broken
torch.compile. Each ends in one ``Error:`` line, a non-zero exit and nothing half-written left behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import click
import pytest
import safetensors.torch
import timm
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

from stvit_cli.commands._common import quiet_option
from stvit_cli.main import StvitGroup, _handle_sigterm, cli
from stvit_core import files
from stvit_core.checkpoint import save_model
from stvit_core.demo import run_demo
from stvit_core.distributed import DistInfo
from stvit_core.errors import OutputExistsError, StvitError
from stvit_core.files import (
    atomic_directory,
    atomic_write_bytes,
    check_output_path,
    copy_file,
    rename_into_place,
    temporary_file,
)
from stvit_core.train_outputs import check_output_dir, output_directory

from .conftest import REPO_ROOT, TINY_VIT, assert_one_line_error, cli_env, run_cli

NO_SPACE = os.strerror(errno.ENOSPC)
# what safetensors (Rust) raises on a full disk: not an OSError
SAFETENSORS_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"


def leftovers(folder: Path) -> list:
    """Temporary names the writers use (``.NAME.tmp-*``, ``.NAME.old-*``) left in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def tiny_model():
    return timm.create_model("stvit_deit_tiny_patch16_224", pretrained=False, num_semantic_tokens=4, **TINY_VIT)


def group_with(command: click.Command) -> click.Group:
    """A fresh ``stvit`` group (the real error funnel) holding one test command."""
    group = StvitGroup(name="stvit")
    group.add_command(command)
    return group


# ------------------------------------------------------------------------------------------------ a full disk

def _full_safetensors(tensors, filename, metadata=None):
    Path(filename).write_bytes(b"\0" * 1000)  # half a file, as a real full disk leaves
    raise SafetensorError(SAFETENSORS_FULL)


def test_a_full_disk_under_safetensors_names_the_output_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _full_safetensors)
    with pytest.raises(StvitError) as info:
        save_model(tiny_model(), tmp_path / "conv")
    assert str(info.value) == f"cannot write {tmp_path / 'conv'}: {NO_SPACE}"
    assert list(tmp_path.iterdir()) == []


def test_convert_on_a_full_disk_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _full_safetensors)
    out = tmp_path / "conv"
    result = run_cli("convert", "deit_tiny", "--no-pretrained", "-o", out)
    assert_one_line_error(result, f"cannot write {out}: {NO_SPACE}")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_a_plain_write_names_the_file(tmp_path, monkeypatch):
    real_write_bytes = Path.write_bytes

    def full_disk(self, data):  # part of the data lands, then the disk is full
        real_write_bytes(self, data[:10])
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(StvitError, match=f"^cannot write {tmp_path / 'metrics.csv'}: {NO_SPACE}$"):
        atomic_write_bytes(tmp_path / "metrics.csv", b"epoch\n1\n")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_under_a_foreign_writer_is_told_by_the_file_system(tmp_path, monkeypatch):
    """torch's stream writer says only "file write failed": the file system says the disk is full."""
    monkeypatch.setattr(files, "_no_space_left", lambda where: True)
    with pytest.raises(StvitError, match=f"^cannot write {tmp_path / 'm.pt2'}: {NO_SPACE}$"):
        with temporary_file(tmp_path / "m.pt2") as tmp:
            tmp.write_bytes(b"x")
            raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(files, "_no_space_left", lambda where: False)  # a plain bug stays itself
    with pytest.raises(RuntimeError), temporary_file(tmp_path / "m.pt2"):
        raise RuntimeError("something else")


def test_copying_the_best_checkpoint_on_a_full_disk_leaves_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "last.pth").write_bytes(b"x" * 100)

    def full_copy(src, dst, **_):  # as shutil does: the error names the source, the target filled the disk
        Path(dst).write_bytes(b"x" * 10)
        raise OSError(errno.ENOSPC, NO_SPACE, str(src), None, str(dst))

    monkeypatch.setattr(files.shutil, "copyfile", full_copy)
    with pytest.raises(StvitError, match=f"^cannot write {tmp_path / 'best.pth'}: {NO_SPACE}$"):
        copy_file(tmp_path / "last.pth", tmp_path / "best.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth"]
    monkeypatch.undo()
    copy_file(tmp_path / "last.pth", tmp_path / "best.pth")
    assert (tmp_path / "best.pth").read_bytes() == b"x" * 100


def test_a_demo_that_fails_leaves_no_output_folder(tmp_path, monkeypatch):
    import stvit_core.demo as demo

    def full(model, directory, **_):
        raise StvitError(f"cannot write {directory}: {NO_SPACE}")

    monkeypatch.setattr(demo, "save_model", full)
    with pytest.raises(StvitError, match=NO_SPACE):
        run_demo(tmp_path / "runs" / "demo", epochs=1)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path, request):
    """A real tmpfs (2 MB unless the test parametrizes another size), where the machine lets the tests mount one."""
    mount = tmp_path / "full"
    mount.mkdir()
    size = getattr(request, "param", "2m")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.slow
def test_convert_onto_a_real_full_disk(small_disk):
    out = small_disk / "conv"
    result = run_cli("convert", "deit_tiny", "--no-pretrained", "-o", out)
    assert_one_line_error(result, f"cannot write {out}: {NO_SPACE}")
    assert list(small_disk.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", ["3500k"], indirect=True)  # room for best/ and last.pth, not its copy
def test_finetune_onto_a_real_full_disk_names_the_file_and_leaves_no_temporary(small_disk, tmp_path):
    from .train_utils import make_subset

    data = make_subset(tmp_path / "data", 10, 5)
    out = small_disk / "run"
    result = run_cli("finetune", "-m", "stvit_deit_tiny_patch16_224", "--no-pretrained", "--tokens", "4",
                     "--model-arg", "img_size=28", "--model-arg", "patch_size=4", "--model-arg", "embed_dim=48",
                     "--model-arg", "depth=6", "--model-arg", "num_heads=2", "--model-arg", "num_image_blocks=2",
                     "--num-classes", "10", "-d", data, "-o", out, "--epochs", "1", "-b", "10", "--workers", "0",
                     "--quiet")
    assert_one_line_error(result, f"cannot write {out / 'checkpoints' / 'best.pth'}: {NO_SPACE}")
    assert [p.name for p in out.rglob(".*")] == []


# ------------------------------------------------------------------------------------------------ SIGTERM

def test_sigterm_runs_the_clean_up_ctrl_c_runs(tmp_path):
    @click.command()
    def write() -> None:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half").write_bytes(b"x")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends

    previous = signal.getsignal(signal.SIGTERM)
    try:
        _handle_sigterm()
        result = CliRunner().invoke(group_with(write), ["write"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result.exit_code == 143, result.output
    assert result.output.strip() == "Error: terminated"
    assert list(tmp_path.iterdir()) == []


def _sigterm_mid_write(args, folder: Path, temporary: str, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "stvit_cli", *map(str, args)], env=cli_env(), cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(folder.glob(temporary)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert proc.returncode == 143, stderr
    assert lines == ["Error: terminated"], stderr
    assert leftovers(folder) == []


@pytest.mark.slow
def test_sigterm_during_convert_leaves_no_temporary_folder(tmp_path):
    _sigterm_mid_write(["convert", "deit_tiny", "--no-pretrained", "-o", tmp_path / "conv"], tmp_path,
                       ".conv.tmp-*", tmp_path)
    assert not (tmp_path / "conv").exists()


@pytest.mark.slow
def test_sigterm_during_export_leaves_no_temporary_file(tmp_path):
    model = save_model(tiny_model(), tmp_path / "model")
    _sigterm_mid_write(["export", model, "--format", "pt2", "-o", tmp_path / "m.pt2"], tmp_path,
                       ".m.pt2.tmp-*.pt2", tmp_path)
    assert not (tmp_path / "m.pt2").exists()


# ------------------------------------------------------------------------------------------------ two writers

def race(write) -> tuple:
    """Writers "a" and "b" run ``write(name, both_ready)`` in two threads; returns (winner, the loser's error)."""
    both_ready = threading.Barrier(2)
    outcome = {}

    def writer(name: str) -> None:
        try:
            write(name, both_ready)
            outcome[name] = "won"
        except OutputExistsError as e:
            outcome[name] = str(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winner = [n for n, o in outcome.items() if o == "won"]
    assert len(winner) == 1, outcome
    return winner[0], outcome[({"a", "b"} - set(winner)).pop()]


def test_of_two_writers_of_one_folder_exactly_one_wins(tmp_path):
    out = tmp_path / "conv"

    def write(name, both_inside):
        with atomic_directory(out) as tmp:
            (tmp / "who").write_text(name)
            both_inside.wait(timeout=30)

    winner, loser = race(write)
    assert loser == f"{out} already exists (use --force to overwrite)"
    assert (out / "who").read_text() == winner
    assert leftovers(tmp_path) == []


def test_a_folder_that_appeared_meanwhile_is_not_replaced(tmp_path):
    out = tmp_path / "conv"
    with pytest.raises(OutputExistsError, match="use --force"):
        with atomic_directory(out) as tmp:
            (tmp / "mine").write_text("x")
            out.mkdir()  # another writer, done first (even an empty folder: rename would replace it)
    assert list(out.iterdir()) == [] and leftovers(tmp_path) == []
    with atomic_directory(out, force=True) as tmp:  # --force replaces it
        (tmp / "mine").write_text("x")
    assert (out / "mine").exists() and leftovers(tmp_path) == []


def test_of_two_writers_of_one_file_exactly_one_wins(tmp_path):
    out = check_output_path(tmp_path / "m.onnx")

    def write(name, both_written):
        with temporary_file(out, suffix=".onnx") as tmp:
            tmp.write_text(name)
            both_written.wait(timeout=30)
            rename_into_place(tmp, out, force=False)

    winner, loser = race(write)
    assert out.read_text() == winner
    assert loser == f"{out} already exists (use --force to overwrite)"
    assert leftovers(tmp_path) == []
    atomic_write_bytes(out, b"forced")  # the default (metrics, checkpoints) replaces
    assert out.read_bytes() == b"forced"
    with pytest.raises(OutputExistsError):
        atomic_write_bytes(out, b"again", force=False)
    assert out.read_bytes() == b"forced" and leftovers(tmp_path) == []


def test_export_does_not_replace_a_file_another_export_wrote_meanwhile(tmp_path, monkeypatch):
    from stvit_core import export

    out = tmp_path / "m.pt2"
    real_save = torch.export.save

    def save_while_another_finishes(program, path, **kwargs):
        real_save(program, path, **kwargs)
        out.write_bytes(b"the other export")

    monkeypatch.setattr(export.torch.export, "save", save_while_another_finishes)
    with pytest.raises(OutputExistsError, match="already exists"):
        export.export_model(tiny_model(), out, format="pt2", batch_size=1)
    assert out.read_bytes() == b"the other export" and leftovers(tmp_path) == []


def test_a_second_fine_tuning_run_into_one_output_fails_at_once(tmp_path):
    out = tmp_path / "run"
    dist = DistInfo()  # one process: rank 0
    first_inside, second_done = threading.Event(), threading.Event()

    def first_run() -> None:
        with output_directory(out, dist, resume=False):
            (out / "config.yaml").write_text("first")
            first_inside.set()
            second_done.wait(timeout=30)

    first = threading.Thread(target=first_run)
    first.start()
    try:
        assert first_inside.wait(timeout=30)
        message = f"{out} already exists and is not empty (use --force, or --resume to continue)"
        with pytest.raises(OutputExistsError) as early:  # the CLI's check, before any slow work
            check_output_dir(str(out), resume=False, force=False)
        with pytest.raises(OutputExistsError) as late:  # both passed the check together
            with output_directory(out, dist, resume=False):
                pass
        with pytest.raises(OutputExistsError, match="being written by another run"):
            check_output_dir(str(out), resume=False, force=True)  # --force cannot take over a live run
        assert str(early.value) == str(late.value) == message
        assert (out / "config.yaml").read_text() == "first"
    finally:
        second_done.set()
        first.join()
    (out / "metrics.csv").write_text("epoch\n")  # the first run finished between the second's check and start
    with pytest.raises(OutputExistsError, match="not empty"):
        with output_directory(out, dist, resume=False):
            pass
    with output_directory(out, dist, resume=True):  # resuming it is fine
        pass


# ------------------------------------------------------------------------------------------------ odd paths

def test_a_dangling_symbolic_link_is_an_existing_output(tmp_path):
    link = tmp_path / "m.onnx"
    link.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputExistsError, match="use --force"):
        check_output_path(link)
    with pytest.raises(OutputExistsError, match="use --force"):
        with atomic_directory(link):
            pass
    with pytest.raises(OutputExistsError, match="not a directory"):
        check_output_dir(str(link), resume=False, force=False)
    assert_one_line_error(run_cli("export", "stvit_deit_tiny_patch16_224", "-o", link), "already exists", "--force")
    assert link.is_symlink()
    assert check_output_path(link, force=True) == link


def test_a_newline_in_a_path_stays_on_the_error_line(tmp_path):
    out = tmp_path / "no\nsuch" / "m.onnx"
    result = run_cli("export", "stvit_deit_tiny_patch16_224", "-o", out)
    assert_one_line_error(result, "no\\nsuch", "does not exist")


# ------------------------------------------------------------------------------------------------ --quiet

def test_quiet_silences_python_warnings_for_the_command():
    @click.command()
    @quiet_option
    def noisy(quiet) -> None:
        warnings.warn("This DataLoader will create 64 worker processes in total", UserWarning)
        click.echo(f"PYTHONWARNINGS={os.environ.get('PYTHONWARNINGS')}")

    group = group_with(noisy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loud = CliRunner().invoke(group, ["noisy"])
        assert len(caught) == 1
        quiet = CliRunner().invoke(group, ["noisy", "-q"])
        assert len(caught) == 1, [str(w.message) for w in caught]  # nothing more
        warnings.warn("after the command", UserWarning)  # the filters come back
        assert len(caught) == 2
    assert loud.exit_code == quiet.exit_code == 0
    assert "PYTHONWARNINGS=ignore" in quiet.output  # DataLoader workers inherit it
    assert os.environ.get("PYTHONWARNINGS") != "ignore"


def test_every_quiet_option_of_the_cli_silences_warnings():
    def quiet_options(command):
        for param in command.params:
            if param.name == "quiet":
                yield param
        for sub in getattr(command, "commands", {}).values():
            yield from quiet_options(sub)

    options = list(quiet_options(cli))
    assert options and all(o.callback is not None and o.callback.__name__ == "_quiet_callback" for o in options)


# ------------------------------------------------------------------------------------------------ torch.compile

@pytest.mark.slow
def test_torch_compile_without_a_compiler_is_one_line(tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    @click.command()
    def compiled() -> None:
        torch.compile(lambda x: torch.sin(x) + 1)(torch.randn(4))

    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, "/nonexistent"))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    torch._dynamo.reset()
    try:
        result = CliRunner().invoke(group_with(compiled), ["compiled"])
    finally:
        torch._dynamo.reset()
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: torch.compile failed: "), result.output
    assert lines[0].endswith("; run without --compile") and "compiler" in lines[0]
