"""What the commands share: options defined once (same names, types, ranges and defaults everywhere), the
``--device`` type, and the one JSON output helper.

Nothing here imports torch, timm or stvit_core: ``stvit --help`` and usage errors stay instant.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Any, Callable, Optional

import click

F = Callable[..., Any]


class LibraryOption(click.Option):
    """A click option that knows the stvit_core argument it feeds (``--tokens`` -> ``num_semantic_tokens``).

    The click group uses this to name the option the user typed in errors raised by the library.
    """

    def __init__(self, *args: Any, library_name: Optional[str] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.library_name = library_name


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``; ``auto`` becomes None (CUDA when available, else CPU).

    Only the spelling is checked here (without importing torch); whether the machine has the device is
    checked by ``stvit_core.device.resolve_device`` when the command runs.
    """

    name = "device"
    _PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")  # as stvit_core.device (which imports torch)

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Optional[str]:
        if value is None:
            return None
        spec = str(value).strip().lower()
        if not self._PATTERN.match(spec):
            self.fail(f"{value!r} is not a device: use auto, cpu, cuda, cuda:N or mps", param, ctx)
        return None if spec == "auto" else spec


def device_option(func: F) -> F:
    return click.option("--device", type=DeviceType(), default="auto", show_default=True, metavar="DEVICE",
                        help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.")(func)


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON object on stdout and nothing else (errors still go to stderr).")(func)


def silence_warnings() -> None:
    """No Python warnings for the rest of the command (the group puts the filters back when it ends); DataLoader
    workers, forked or spawned, inherit the setting."""
    warnings.simplefilter("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"


def _quiet_callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value:
        silence_warnings()
    return value


def quiet_option(func: F) -> F:
    return click.option("--quiet", "-q", is_flag=True, default=None, callback=_quiet_callback,
                        help="No progress bars, per-step lines or library warnings.")(func)


def model_argument(func: F) -> F:
    return click.argument("model", metavar="MODEL")(func)


def model_option(help_text: str) -> Callable[[F], F]:
    return click.option("--model", "-m", "model_spec", required=True, metavar="MODEL", help=help_text)


def tokens_option(param_name: str = "num_semantic_tokens", default_help: str = "16") -> Callable[[F], F]:
    """``--tokens N`` (DeiT/ViT semantic tokens). None when not given, so that a Swin model can refuse it."""
    return click.option("--tokens", param_name, cls=LibraryOption, library_name="num_semantic_tokens",
                        type=click.IntRange(min=1), default=None, show_default=default_help, metavar="N",
                        help="Semantic tokens of an STViT-DeiT/ViT: a perfect square (16, 36, 64, 100...) no larger "
                             "than the number of patches. Not for Swin (use --tokens-per-window).")


def tokens_per_window_option(func: F, default_help: str = "9, as released") -> F:
    """``--tokens-per-window N`` (Swin). None when not given, so that a DeiT/ViT model can refuse it."""
    return click.option("--tokens-per-window", "semantic_tokens_per_window", cls=LibraryOption,
                        library_name="semantic_tokens_per_window", type=click.IntRange(min=1), default=None,
                        show_default=default_help, metavar="N",
                        help="Semantic tokens per 7x7 window of an STViT-R-Swin: 4, 9 or 16. Not for DeiT/ViT "
                             "(use --tokens).")(func)


def source_model_options(func: Optional[F] = None, *, bare_source_names: bool = True) -> Any:
    """MODEL and how to convert it: ``--tokens`` (DeiT/ViT), ``--tokens-per-window`` (Swin), ``--recovery``.

    ``bare_source_names=False``: the command takes STViT models only, so a source name is converted only when
    one of these options says how, and the options show no default (export, predict).
    """
    if func is None:
        return lambda f: source_model_options(f, bare_source_names=bare_source_names)
    func = click.option("--recovery", is_flag=True,
                        help="DeiT/ViT: STViT-R (dumbbell units that keep the 14x14 map, for dense tasks) "
                             "instead of STViT.")(func)
    if bare_source_names:
        return model_argument(tokens_option()(tokens_per_window_option(func)))
    needed = "none: a source name needs --tokens, --tokens-per-window or --recovery"
    return model_argument(tokens_option(default_help=needed)(tokens_per_window_option(func, default_help=needed)))


def positive_int(**kwargs: Any) -> click.IntRange:
    return click.IntRange(min=1, **kwargs)


def non_negative_int() -> click.IntRange:
    return click.IntRange(min=0)


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, without NaN (which passes every range comparison) or infinity."""

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def positive_float() -> click.FloatRange:
    return FiniteFloatRange(min=0, min_open=True)


def non_negative_float() -> click.FloatRange:
    return FiniteFloatRange(min=0)


def probability(max_open: bool = False) -> click.FloatRange:
    return FiniteFloatRange(min=0, max=1, max_open=max_open)


def unit_interval_open_at_zero() -> click.FloatRange:
    return FiniteFloatRange(min=0, max=1, min_open=True)


def echo_json(obj: Any) -> None:
    """Print one JSON object on stdout: the only thing a ``--json`` command prints there."""
    click.echo(json.dumps(obj, indent=2, default=str))


class RecordingGroup(click.Group):
    """A group that records which command it runs in ``ctx.meta`` (shared by nested contexts), so that the
    top-level error handler can name that command's options."""

    def resolve_command(self, ctx: click.Context, args: Any) -> Any:
        name, command, rest = super().resolve_command(ctx, args)
        if command is not None:
            ctx.meta.setdefault("stvit.commands", []).append(command)
        return name, command, rest
