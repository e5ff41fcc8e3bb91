"""Shared fixtures: a CLI runner (in-process, or a real process where that is the point), tiny models, and thread limits for a 2-core machine."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import subprocess
import sys
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# Keep each test process light: CI has 2 cores.
torch.set_num_threads(1)

# Small STViT-DeiT settings: real architecture, tiny width, so tests run in seconds.
TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=48, depth=12, num_heads=3, num_classes=10)


def cli_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["HF_HUB_OFFLINE"] = env.get("HF_HUB_OFFLINE", "1")  # tests never reach the real Hub
    env["HF_HUB_DISABLE_TELEMETRY"] = "1"
    if extra:
        env.update(extra)
    return env


class CliResult:
    """One ``stvit`` run: what the user would see (``returncode``, ``stdout``, ``stderr``), however it ran."""

    def __init__(self, args: Sequence[str], returncode: int, stdout: str, stderr: str) -> None:
        self.args, self.returncode, self.stdout, self.stderr = list(args), returncode, stdout, stderr

    def __repr__(self) -> str:
        return f"CliResult(args={self.args!r}, returncode={self.returncode})"


def run_cli(*args: str, env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None, timeout: float = 600,
            check: bool = False, exact_env: bool = False, fresh_process: bool = False) -> CliResult:
    """Run ``stvit ARGS`` and return its exit code, stdout and stderr.

    In this process by default (``stvit_cli.main.main``, the console script's entry point, with the environment,
    working directory, ``huggingface_hub`` settings, warnings and logging of a fresh process): a new interpreter
    pays the torch + timm import, seconds per run. ``fresh_process=True`` runs ``python -m stvit_cli`` instead, for
    what only a real process shows (start-up, signals, exit status seen by a shell). ``env`` adds to this process's
    environment, or with ``exact_env=True`` is the whole environment. ``timeout`` applies to a fresh process.
    """
    argv = [str(a) for a in args]
    environment = dict(env or {}) if exact_env else cli_env(env)
    if fresh_process:
        proc = subprocess.run([sys.executable, "-m", "stvit_cli", *argv], capture_output=True, text=True,
                              env=environment, cwd=cwd, timeout=timeout)
        result = CliResult(argv, proc.returncode, proc.stdout, proc.stderr)
    else:
        result = _run_in_process(argv, environment, cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"stvit {' '.join(argv)} failed ({result.returncode}):\n{result.stderr}")
    return result


# A fresh interpreter's warning filters (python -W not given): what a user running `stvit` would see printed.
_DEFAULT_WARNING_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, None),
                            ("ignore", PendingDeprecationWarning, None), ("ignore", ImportWarning, None),
                            ("ignore", ResourceWarning, None))


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _fresh_hub_constants() -> Dict[str, object]:
    """huggingface_hub's settings as a process started with the current environment would read them at import."""
    spec = importlib.util.find_spec("huggingface_hub.constants")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: value for name, value in vars(module).items() if name.isupper()}


def _run_in_process(argv: List[str], environment: Dict[str, str], cwd: Optional[Path]) -> CliResult:
    import click.formatting
    from click.testing import CliRunner
    from huggingface_hub import constants

    from stvit_cli.main import main

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    levels = {logger: logger.level for logger in loggers}
    handlers = [h for logger in loggers for h in logger.handlers if type(h) is logging.StreamHandler]
    streams = {h: h.stream for h in handlers}
    root_handlers = list(logging.root.handlers)
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        saved_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(environment)
        if cwd is not None:
            mp.chdir(cwd)
        for name, value in _fresh_hub_constants().items():  # HF_ENDPOINT, HF_HOME... are read at import time
            mp.setattr(constants, name, value, raising=False)
        warnings.resetwarnings()
        for action, category, module in reversed(_DEFAULT_WARNING_FILTERS):
            warnings.filterwarnings(action, category=category, module=module or "")
        warnings.showwarning = _print_warning  # printed on the command's stderr, not recorded by pytest
        mp.setattr(sys, "argv", ["stvit", *argv])
        runner = CliRunner()
        try:
            with runner.isolation() as (out, err, _):
                # help text wrapped as for a pipe (80 columns unless COLUMNS says otherwise), not click's test width
                click.formatting.FORCED_WIDTH = None  # the isolation puts the previous value back
                os.environ.setdefault("COLUMNS", "80")
                for handler in handlers:  # log lines go to the command's stderr, as in a process of its own
                    handler.setStream(sys.stderr)
                # pytest's capturing handlers off the root logger: unhandled records reach stderr (logging's
                # last resort), as they do in a process of its own
                logging.root.handlers = []
                try:
                    main()
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                    if not isinstance(e.code, (int, type(None))):
                        sys.stderr.write(f"{e.code}\n")
                except BaseException:  # what the interpreter would print for an uncaught exception
                    sys.stderr.write(traceback.format_exc())
                    code = 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                stdout, stderr = out.getvalue().decode(), err.getvalue().decode()
        finally:
            logging.root.handlers = root_handlers
            for handler, stream in streams.items():
                handler.setStream(stream)
            for logger, level in levels.items():
                logger.setLevel(level)
            for sig, handler in signals.items():
                signal.signal(sig, handler)
            torch.set_num_threads(threads)
            os.environ.clear()
            os.environ.update(saved_env)
    return CliResult(argv, code, stdout, stderr)


def assert_one_line_error(proc, *fragments: str) -> None:
    """A failed command: non-zero exit, no traceback, one 'Error: ...' line naming the fragments."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def tiny_vit_checkpoint(tmp_path: Path) -> Path:
    """A real DeiT-Tiny-shaped (patch 16, 224 px) checkpoint file, randomly initialised, as a user would have."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": model.state_dict(), "epoch": 300}, path)
    return path


from .hub_fixtures import hub_server, tiny_model_dir  # noqa: E402,F401  (loopback Hub server fixtures)
