"""``stvit finetune``: fine-tune a converted (or any timm) model on an ImageFolder; torchrun-ready."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Dict, Optional, Tuple

import click
from click.core import ParameterSource

from . import _checks
from ._common import (
    LibraryOption,
    device_option,
    echo_json,
    json_option,
    model_option,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    quiet_option,
    silence_warnings,
    tokens_option,
    tokens_per_window_option,
    unit_interval_open_at_zero,
)


def _parse_model_args(values: Tuple[str, ...]) -> Dict[str, Any]:
    """``key=value`` pairs; values are parsed as JSON when they can be (numbers, lists, true/false)."""
    from stvit_core.errors import InvalidArgumentError

    args: Dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InvalidArgumentError(f"--model-arg takes key=value, not {item!r}")
        try:
            args[key] = json.loads(raw)
        except json.JSONDecodeError:
            args[key] = raw
    return args


# Options that tune distillation or the EMA: without it they cannot apply. (flag, what turns it on, in a file)
_DEPENDENT_OPTIONS = {
    "teacher": ("--distill soft|hard", "distill", "distill: soft|hard"),
    "distill_alpha": ("--distill soft|hard", "distill", "distill: soft|hard"),
    "distill_tau": ("--distill soft|hard", "distill", "distill: soft|hard"),
    "model_ema_decay": ("--model-ema", "model_ema", "model_ema: true"),
}


def _file_only_types() -> Dict[str, click.ParamType]:
    """Types of the config keys that have no command-line option."""
    from timm.optim import list_optimizers

    return {
        "base_batch": positive_int(), "warmup_lr": non_negative_float(),
        "scale_min": unit_interval_open_at_zero(),
        # timm's schedulers that step per update without a metric or extra decay settings (as train() runs them)
        "sched": click.Choice(["cosine", "tanh", "step", "multistep", "poly", "constant"]),
        "opt": click.Choice(list_optimizers()),
    }


def _config_param(ctx: click.Context) -> click.Parameter:
    """--config, which errors about the file's values are reported against."""
    return next(p for p in ctx.command.params if p.name == "config_file")


def _config_converter(ctx: click.Context, config_file: Optional[str],
                      given: Dict[str, str]) -> Callable[[str, Any], Any]:
    """Each value of --config FILE through its command-line option's own click type, as if typed as a flag,
    so that the file and the flags take the same values; ``given`` collects name -> key as written."""
    from stvit_core.train import TrainConfig

    fields = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    types = {p.name.rstrip("_"): p.type for p in ctx.command.params if isinstance(p, click.Option) and p.name}
    types = {**{k: v for k, v in types.items() if k in fields}, **_file_only_types()}
    config_param = _config_param(ctx)

    def convert(key: str, value: Any) -> Any:
        name = key.replace("-", "_")
        given[name] = key
        if name not in types:
            return value  # not an option: resolve_config names every unknown key
        try:
            if value is None:
                if fields[name].startswith("Optional"):
                    return None  # off / automatic, as the option's default
                raise click.BadParameter("needs a value")
            if isinstance(value, (list, dict)):
                raise click.BadParameter(f"{value!r} is not a single value")
            # as a string, as on the command line: 2.5 is not an integer and true is not a number
            return types[name].convert(value if isinstance(value, str) else str(value), None, ctx)
        except click.BadParameter as e:
            raise click.BadParameter(f"{config_file}: {key}: {e.message}", ctx, config_param) from None

    return convert


def _check_dependent_options(ctx: click.Context, cfg: Any, config_file: Optional[str],
                             from_file: Dict[str, str]) -> None:
    """--lr with --base-lr, --teacher, --distill-alpha/-tau without --distill and --model-ema-decay without
    --model-ema: errors."""
    from stvit_core.errors import InvalidArgumentError

    # --lr and --base-lr: one would be ignored (a flag still overrides the same key in the file)
    why = "lr is the learning rate itself, base_lr one scaled by the global batch size"
    given = {n for n in ("lr", "base_lr") if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)}
    in_file = {n for n in ("lr", "base_lr") if n in from_file}
    if len(given) == 2:
        raise InvalidArgumentError(f"--lr and --base-lr exclude each other: {why}")
    if len(in_file) == 2:
        raise click.BadParameter(f"{config_file}: {from_file['lr']} and {from_file['base_lr']} exclude each other: "
                                 f"{why}", ctx, _config_param(ctx))
    if given and in_file and given != in_file:
        flag, (key,) = "--" + given.pop().replace("_", "-"), in_file
        raise click.BadParameter(f"{config_file}: {from_file[key]} and {flag} exclude each other: {why}", ctx,
                                 _config_param(ctx))
    for name, (needs, switch, needs_in_file) in _DEPENDENT_OPTIONS.items():
        if getattr(cfg, switch):
            continue
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT):
            raise InvalidArgumentError(f"--{name.replace('_', '-')} applies only with {needs}")
        if name in from_file:
            raise click.BadParameter(f"{config_file}: {from_file[name]} applies only with {needs_in_file}", ctx,
                                     _config_param(ctx))


@click.command()
@model_option("Model directory (from 'stvit convert' or a previous finetune), hf-hub:org/name, a timm name to "
              "convert on the fly (deit_tiny, deit_small_patch16_224...) or an stvit_* name.")
@click.option("--data", "-d", required=True, metavar="DIR",
              help="ImageFolder root with train/ and val/ class folders; 'fashion-mnist' for the embedded subset.")
@click.option("--output", "-o", required=True, metavar="DIR",
              help="Output directory (config.yaml, metrics, checkpoints/, best/ model).")
@tokens_option("tokens", default_help="16 when MODEL is a name to convert")
@tokens_per_window_option
@click.option("--num-classes", type=positive_int(), default=None, show_default="the model's", metavar="N",
              help="Reset the head to this many classes.")
@click.option("--no-pretrained", is_flag=True, cls=LibraryOption, library_name="pretrained",
              help="Start from random weights (model names only; not with --checkpoint).")
@click.option("--checkpoint", default=None, metavar="FILE", show_default="the name's pretrained weights",
              help="Weights file for a model name (not for a model directory).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Extra model constructor argument, e.g. img_size=32 patch_size=4 (repeatable).")
@click.option("--recipe", type=click.Choice(["finetune", "paper"]), default=None, show_default="finetune",
              help="Preset: 'finetune' (short, light) or 'paper' (the STViT/DeiT 300-epoch recipe); the defaults "
                   "below marked 'paper:' change with it.")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="YAML file of options (names as below, with underscores; same types and ranges); "
                   "command-line options win.")
@click.option("--epochs", type=positive_int(), default=None, show_default="30; paper: 300", metavar="N",
              help="Training epochs.")
@click.option("--batch-size", "-b", type=positive_int(), default=None, show_default="64", metavar="N",
              help="Images per step, per process.")
@click.option("--accum-steps", type=positive_int(), default=None, show_default="1", metavar="N",
              help="Gradient accumulation steps.")
@click.option("--lr", type=positive_float(), default=None, show_default="base-lr x global batch / base batch",
              help="Peak learning rate (the base batch is 512; paper: 1024).")
@click.option("--base-lr", type=positive_float(), default=None, show_default="5e-4; paper: 1e-3",
              help="Learning rate per base batch, scaled linearly with the global batch when --lr is not given.")
@click.option("--min-lr", type=non_negative_float(), default=None, show_default="1e-6; paper: 1e-5",
              help="Learning rate at the end of the cosine schedule.")
@click.option("--warmup-epochs", type=non_negative_float(), default=None, show_default="1; paper: 20",
              help="Epochs of linear warm-up.")
@click.option("--weight-decay", type=non_negative_float(), default=None, show_default="0.05",
              help="AdamW weight decay.")
@click.option("--layer-decay", type=unit_interval_open_at_zero(), default=None,
              show_default="off", help="Layer-wise lr decay (e.g. 0.75).")
@click.option("--clip-grad", type=non_negative_float(), default=None, show_default="5.0",
              help="Gradient norm clipping (0 = off).")
@click.option("--drop-path", type=probability(max_open=True), default=None, show_default="0.1",
              help="Stochastic depth rate.")
@click.option("--smoothing", type=probability(max_open=True), default=None, show_default="0.1",
              help="Label smoothing.")
@click.option("--mixup", type=non_negative_float(), default=None, show_default="0 = off; paper: 0.8",
              help="Mixup alpha.")
@click.option("--cutmix", type=non_negative_float(), default=None, show_default="0 = off; paper: 1.0",
              help="CutMix alpha.")
@click.option("--aa", default=None, metavar="SPEC", show_default="off; paper: rand-m9-mstd0.5",
              help="RandAugment spec, e.g. rand-m9-mstd0.5-inc1.")
@click.option("--reprob", type=probability(), default=None, show_default="0; paper: 0.25",
              help="Random erasing probability.")
@click.option("--model-ema/--no-model-ema", default=None, show_default="off",
              help="Keep an EMA of the weights (timm ModelEmaV3).")
@click.option("--model-ema-decay", type=probability(), default=None, show_default="0.9998",
              help="EMA decay (with --model-ema).")
@click.option("--distill", type=click.Choice(["soft", "hard"]), default=None, show_default="off",
              help="Distil from the teacher's head output: soft KL or hard labels.")
@click.option("--teacher", default=None, metavar="MODEL", show_default="with --distill: the source of a converted name",
              help="Teacher model (directory, hf-hub: or name), with --distill.")
@click.option("--distill-alpha", type=probability(), default=None, show_default="0.5",
              help="Weight of the distillation loss (with --distill).")
@click.option("--distill-tau", type=positive_float(), default=None, show_default="1.0",
              help="Temperature of soft distillation (with --distill).")
@click.option("--amp", type=click.Choice(["bf16", "fp16"]), default=None, show_default="off, float32",
              help="Autocast to this dtype, on GPU or CPU (fp16 adds a grad scaler).")
@click.option("--compile", "compile_", is_flag=True, default=None, help="torch.compile the model.")
@click.option("--workers", type=non_negative_int(), default=None, show_default="2", metavar="N",
              help="Data loader workers per process.")
@click.option("--seed", type=non_negative_int(), default=None, show_default="0", metavar="N",
              help="Random seed (data order, augmentation, new weights).")
@device_option
@click.option("--checkpoint-every-steps", type=non_negative_int(), default=None, show_default="0 = every epoch only",
              metavar="K", help="Also checkpoint every K optimizer steps.")
@click.option("--deterministic", is_flag=True, default=None, help="torch.use_deterministic_algorithms(True).")
@click.option("--resume", default=None, type=click.Path(dir_okay=False), metavar="FILE",
              help="Continue exactly from a checkpoint (OUT/checkpoints/last.pth).")
@click.option("--force", is_flag=True, help="Write into a non-empty output directory.")
@quiet_option
@json_option
def finetune(model_spec: str, data: str, output: str, tokens: Optional[int], num_classes: Optional[int],
             no_pretrained: bool, checkpoint: Optional[str], model_args: Tuple[str, ...], recipe: Optional[str],
             config_file: Optional[str], teacher: Optional[str], resume: Optional[str], force: bool,
             as_json: bool, compile_: Optional[bool], **options: Any) -> None:
    """Fine-tune MODEL on an ImageFolder dataset and export the best model to OUTPUT/best.

    Runs on one CPU or GPU, or on many GPUs and machines when launched with torchrun (DDP). Checkpoints
    every epoch; Ctrl-C or SIGTERM saves one and exits; --resume continues exactly. Corrupt images stop
    the run with an error naming the file.

    \b
    Examples:
      stvit finetune -m stvit-deit-s -d /data/imagenet -o runs/ft --epochs 30
      stvit finetune -m deit_tiny --tokens 16 --no-pretrained -d fashion-mnist -o runs/fm \\
          --model-arg img_size=32 --model-arg patch_size=4 --num-classes 10 --epochs 5
      stvit finetune -m runs/fm/best -d fashion-mnist -o runs/fm2 --distill soft --teacher runs/deit/best
      stvit finetune -m runs/fm/best -d fashion-mnist -o runs/fm --resume runs/fm/checkpoints/last.pth
      torchrun --nproc_per_node 8 -m stvit_cli finetune -m stvit-deit-s -d /data/imagenet -o runs/ft --amp bf16
    """
    _checks.check_data_folder(data, "train")  # before the seconds of importing torch
    _checks.check_checkpoint_file(checkpoint)
    from stvit_core import load_model
    from stvit_core import train as st
    from stvit_core.data import resolve_data_root, split_folder
    from stvit_core.device import resolve_device
    from stvit_core.errors import InvalidArgumentError
    from stvit_core.train_outputs import check_output_dir

    ctx = click.get_current_context()
    tokens_per_window = options.pop("semantic_tokens_per_window", None)  # Swin names only
    overrides = dict(options, data=data, output=output, recipe=recipe, compile=compile_)
    from_file: Dict[str, str] = {}
    cfg = st.resolve_config(recipe, config_file, overrides, convert=_config_converter(ctx, config_file, from_file))
    if cfg.quiet:  # also when the config file says quiet: true
        silence_warnings()
    _check_dependent_options(ctx, cfg, config_file, from_file)
    kwargs = _parse_model_args(model_args)

    # Fail on what can be checked before building models: device, output, head size, data folder.
    resolve_device(cfg.device)
    check_output_dir(output, resume=bool(resume), force=force)
    if num_classes is not None and num_classes < 1:
        raise InvalidArgumentError("--num-classes must be at least 1")
    split_folder(resolve_data_root(data), "train")
    import torch

    torch.manual_seed(cfg.seed)  # a new head and random init are reproducible (torch's default seed is not)
    if "drop_path_rate" in kwargs:  # the recipe always sets it: one of the two would silently win
        raise InvalidArgumentError("--model-arg drop_path_rate: set it with --drop-path")
    if "num_classes" in kwargs and num_classes is not None:
        raise InvalidArgumentError("--model-arg num_classes and --num-classes both set the head: give --num-classes only")
    student = load_model(model_spec, num_semantic_tokens=tokens, semantic_tokens_per_window=tokens_per_window,
                         pretrained=not no_pretrained, checkpoint=checkpoint, convert=True, **kwargs,
                         **({} if num_classes is None else {"num_classes": num_classes}),
                         **({} if cfg.drop_path is None else {"drop_path_rate": cfg.drop_path}))
    teacher_model = None
    if cfg.distill:
        teacher_model = st.teacher_for(student, model_spec, teacher, pretrained=not no_pretrained,
                                       checkpoint=checkpoint, model_kwargs=kwargs)

    verbose = not cfg.quiet and not as_json

    def report(row: Dict[str, Any]) -> None:
        if verbose:
            ema = f"  ema top1 {row['ema_top1']:.2f}" if row.get("ema_top1") is not None else ""
            top5 = "n/a" if row["top5"] is None else f"{row['top5']:.2f}"  # five classes or fewer
            click.echo(f"epoch {row['epoch']:>3}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}"
                       f"  top1 {row['top1']:.2f}  top5 {top5}{ema}  "
                       f"({row['train_img_per_sec']:.0f} img/s)", err=True)

    def resuming(where: Dict[str, Any]) -> None:
        within = f" (batch {where['batches_done']} of it done)" if where["batches_done"] else ""
        done = f"; all {cfg.epochs} epochs are done" if where["epoch"] >= cfg.epochs else ""
        click.echo(f"resuming from {where['path']} at epoch {where['epoch'] + 1}{within}, step {where['step']}{done}",
                   err=True)
        if where["checkpoint_world_size"] != where["world_size"]:
            click.echo(f"Warning: the checkpoint was written by {where['checkpoint_world_size']} process(es), this "
                       f"run has {where['world_size']}: it continues, but not bit for bit", err=True)

    # config.yaml records the model that runs (architecture, tokens, model_args) from the model itself
    result = st.train(cfg, student, teacher=teacher_model, resume=resume, force=force, on_epoch_end=report,
                      on_resume=resuming, extra_config={"model": model_spec, "teacher": teacher,
                                                        "pretrained": not no_pretrained, "checkpoint": checkpoint})
    if int(result.get("world_size", 1)) > 1:
        import torch.distributed

        if torch.distributed.get_rank() != 0:
            return
    if as_json:
        echo_json(result)
    else:
        click.echo(f"best top-1 {result['best_top1']:.2f} at epoch {result['best_epoch']}; "
                   f"model saved to {output}/best")
