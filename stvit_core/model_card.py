"""The model card of a model directory: huggingface_hub's ``ModelCard`` with the body in ``templates/model_card.md``.

The front matter (``ModelCardData``) names the base model, the datasets and, when a results file lies next to the
weights, the evaluation as a model-index; the body shows the architecture, semantic tokens, parameters, GFLOPs,
speedup, evaluation, usage and citation, from config.json's ``stvit`` record (written by ``stvit convert`` and
``stvit finetune``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors import safe_open

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_config

PathLike = Union[str, os.PathLike]
MODEL_CARD_NAME = "README.md"
TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
# Evaluation results and training configuration that travel with the weights (top level of MODEL_DIR).
EXTRA_FILE_PATTERNS = (
    "results*.json", "results*.csv", "eval*.json", "eval*.csv", "metrics.csv", "metrics.jsonl",
    "summary.csv", "args.yaml", "config.yaml", "train_config.yaml", "training_args.yaml",
)


def find_extra_files(model_dir: PathLike) -> List[Path]:
    """Evaluation results and training configuration files at the top of ``model_dir``."""
    model_dir = Path(model_dir)
    found = {p for pattern in EXTRA_FILE_PATTERNS for p in model_dir.glob(pattern) if p.is_file()}
    return sorted(found - {model_dir / CONFIG_NAME})


_TOP1_KEYS = ("top1", "top-1", "top1_acc", "acc1", "accuracy_top1", "eval_top1")
_TOP5_KEYS = ("top5", "top-5", "top5_acc", "acc5", "accuracy_top5", "eval_top5")


def _pick(record: Dict[str, Any], keys) -> Optional[float]:
    for key in keys:
        value = record.get(key)
        try:
            if value is not None and value != "":
                return float(value)
        except (TypeError, ValueError):
            continue
    return None


def read_eval_results(model_dir: PathLike) -> Optional[Dict[str, Any]]:
    """Top-1 / top-5 (and the dataset, when recorded) from the first results file that has them.

    Reads JSON objects (also nested under ``metrics``/``results``, or a one-element list) and CSV files
    in the format of timm's ``validate.py`` (``top1``, ``top5`` columns, last row wins).
    """
    for path in find_extra_files(model_dir):
        if not path.name.startswith(("results", "eval", "summary")):
            continue
        try:
            if path.suffix == ".json":
                data = json.loads(path.read_text())
                if isinstance(data, list) and data:
                    data = data[-1]
                outer = data if isinstance(data, dict) else {}
                records = [data] + [outer.get(k) for k in ("metrics", "results")]
            elif path.suffix == ".csv":
                with path.open(newline="") as f:
                    rows = list(csv.DictReader(f))
                records, outer = rows[-1:], {}
            else:
                continue
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error):
            continue
        for record in records:
            if isinstance(record, dict) and _pick(record, _TOP1_KEYS) is not None:
                found = {"top1": _pick(record, _TOP1_KEYS), "top5": _pick(record, _TOP5_KEYS),
                         "dataset": record.get("dataset") or outer.get("dataset"), "file": path.name}
                found.update({k: record.get(k) or outer.get(k) for k in ("split", "num_images")
                              if record.get(k) or outer.get(k)})
                return found
    return None


def _count_params(weights: Path) -> Optional[int]:
    try:
        with safe_open(str(weights), framework="pt") as f:
            return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    except Exception:  # the card is still useful without the count
        return None


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _base_model_id(meta: Dict[str, Any]) -> Optional[str]:
    """The Hub id of the model the weights came from: timm names become ``timm/NAME``.

    None when there is none on the Hub: random source weights, a local directory, a description.
    """
    source = meta.get("source_model")
    if not source or meta.get("source_weights") == "random":
        return None
    source = str(source)
    for prefix in ("hf-hub:", "hf_hub:", "timm:"):
        if source.startswith(prefix):
            source = source[len(prefix):]
    source = source.split("@")[0]
    if not _REPO_ID.match(source):
        return None
    return source if "/" in source else f"timm/{source}"


def _dataset_id(value: Any) -> Optional[str]:
    """A dataset name as the Hub writes it (``imagenet-1k``, ``org/name``); None for a local folder path."""
    value = str(value or "")
    return value if _REPO_ID.match(value) else None


def _datasets(meta: Dict[str, Any], pretrained_cfg: Dict[str, Any], evaluation: Optional[dict]) -> List[str]:
    if meta.get("datasets"):
        value = meta["datasets"]
        return [value] if isinstance(value, str) else list(value)
    for candidate in (meta.get("dataset"), _finetuned(meta).get("dataset"), (evaluation or {}).get("dataset")):
        if _dataset_id(candidate):
            return [_dataset_id(candidate)]
    tag = str(meta.get("source_model") or pretrained_cfg.get("tag") or "")
    if "in22k" in tag or "in21k" in tag:
        return ["imagenet-21k"] + (["imagenet-1k"] if "in1k" in tag else [])
    if "in1k" in tag:
        return ["imagenet-1k"]
    return []


def _finetuned(meta: Dict[str, Any]) -> Dict[str, Any]:
    """config.json's ``stvit.finetuned`` (written by ``stvit finetune``) as a dict; ``{}`` when not fine-tuned."""
    value = meta.get("finetuned")
    if isinstance(value, dict):
        return value
    return {"dataset": None} if value else {}


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None or value == "":
        return "n/a"
    try:
        return f"{float(value):.{digits}f}{suffix}"
    except (TypeError, ValueError):
        return str(value)


def _eval_results(evaluation: Optional[dict], datasets: List[str]) -> Optional[List[Any]]:
    """The card's model-index entries (huggingface_hub ``EvalResult``s): top-1 and top-5 on the evaluated data."""
    if not evaluation:
        return None
    name = str(evaluation.get("dataset") or (datasets or ["unknown"])[0])
    dataset_type = _dataset_id(name) or "imagefolder"
    metrics = [("Top-1 accuracy", evaluation["top1"]), ("Top-5 accuracy", evaluation.get("top5"))]
    return [EvalResult(task_type="image-classification", task_name="Image Classification",
                       dataset_type=dataset_type, dataset_name=name, dataset_split=evaluation.get("split"),
                       metric_type="accuracy", metric_name=metric, metric_value=round(float(value), 3))
            for metric, value in metrics if value is not None]


def _card_data(cfg: Dict[str, Any], repo_id: str, evaluation: Optional[dict]) -> Any:
    """The card's YAML front matter as huggingface_hub's ``ModelCardData``."""
    meta, pretrained_cfg = dict(cfg.get("stvit") or {}), dict(cfg.get("pretrained_cfg") or {})
    datasets = _datasets(meta, pretrained_cfg, evaluation)
    license_ = meta.get("license") or pretrained_cfg.get("license") or "other"
    return ModelCardData(
        library_name="timm", license=str(license_).lower(), tags=["image-classification", "timm", "stvit"],
        datasets=datasets or None, base_model=_base_model_id(meta), model_name=repo_id.split("/")[-1],
        eval_results=_eval_results(evaluation, datasets),
    )


def _evaluation_text(evaluation: Optional[dict]) -> str:
    if not evaluation:
        return "No evaluation results were found next to the weights."
    top5 = f", top-5 {evaluation['top5']:.2f}%" if evaluation.get("top5") is not None else ""
    details = [str(v) for v in (evaluation.get("split") and f"{evaluation['split']} split",
                                evaluation.get("num_images") and f"{evaluation['num_images']} images") if v]
    on = f" on {evaluation['dataset']}" if evaluation.get("dataset") else ""
    on += f" ({', '.join(details)})" if details else ""
    return f"Top-1 {evaluation['top1']:.2f}%{top5}{on}, from `{evaluation['file']}`."


def _summary_text(meta: Dict[str, Any]) -> str:
    if not meta.get("source_model"):
        return "A timm image classification model shared with stvit."
    text = f"An STViT model (semantic tokens, CVPR 2023) converted from `{meta['source_model']}`"
    if meta.get("source_weights") == "random":
        text += " (randomly initialised)"
    finetuned = _finetuned(meta)
    if finetuned:
        text += f" and fine-tuned on `{finetuned['dataset']}`" if finetuned.get("dataset") else " and fine-tuned"
    return text + "."


def _card_values(model_dir: Path, cfg: Dict[str, Any], repo_id: str, evaluation: Optional[dict],
                 files: List[str]) -> Dict[str, Any]:
    """The values the body of ``templates/model_card.md`` shows."""
    meta, pretrained_cfg = dict(cfg.get("stvit") or {}), dict(cfg.get("pretrained_cfg") or {})
    params = meta.get("params_m")
    if params is None:
        count = _count_params(model_dir / WEIGHTS_NAME)
        params = count / 1e6 if count is not None else None
    gflops, base_gflops = meta.get("gflops"), meta.get("base_gflops")
    speedup = []
    if gflops and base_gflops:
        speedup.append(f"{float(base_gflops) / float(gflops):.2f}x fewer FLOPs")
    if meta.get("speedup"):
        speedup.append(f"{float(meta['speedup']):.2f}x measured throughput")
    tokens = meta.get("num_semantic_tokens") or (cfg.get("model_args") or {}).get("num_semantic_tokens")
    per_window = meta.get("semantic_tokens_per_window")
    base_model = _base_model_id(meta)
    base_params = meta.get("base_params_m")
    return {
        "title": f"Model card for {repo_id.split('/')[-1]}",
        "summary": _summary_text(meta),
        "architecture": cfg["architecture"],
        "base_model": f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "n/a",
        "num_semantic_tokens": f"{per_window} per window" if per_window else (tokens if tokens else "n/a"),
        "params": _fmt(params, 2, "M") + (f" (base {_fmt(base_params, 2, 'M')})" if base_params else ""),
        "input_size": "x".join(str(v) for v in (pretrained_cfg.get("input_size") or [3, 224, 224])[-2:]),
        "gflops": _fmt(gflops),
        "base_gflops": _fmt(base_gflops),
        "speedup": ", ".join(speedup) or "n/a",
        "num_classes": cfg.get("num_classes", "n/a"),
        "evaluation": _evaluation_text(evaluation),
        "repo_id": repo_id,
        "name": repo_id.split("/")[-1],
        "files": "\n".join(f"- `{name}`" for name in sorted(set(files + [CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME]))),
    }


def render_model_card(model_dir: PathLike, repo_id: str, *, files: Optional[List[str]] = None) -> str:
    """The README.md for ``model_dir``: front matter from huggingface_hub's ``ModelCardData`` (base model,
    datasets, model-index with the evaluation), body from ``templates/model_card.md``."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    evaluation = read_eval_results(model_dir)
    values = _card_values(model_dir, cfg, repo_id, evaluation, list(files or []))
    card = ModelCard.from_template(_card_data(cfg, repo_id, evaluation), template_path=str(TEMPLATE_PATH), **values)
    return str(card)
