"""Sharing models on the Hugging Face Hub: push a model directory, pull it back, write its model card.

Everything goes through ``huggingface_hub`` (``create_repo``, ``create_commit``, ``snapshot_download``),
so authentication, retries, LFS and caching behave exactly as for any other Hub library:

* token: the explicit ``token`` argument, else ``HF_TOKEN``, else the login saved by ``hf auth login``;
* endpoint: the explicit ``endpoint`` argument, else huggingface_hub's ``constants.ENDPOINT`` (``HF_ENDPOINT``,
  read when huggingface_hub is imported), else https://huggingface.co. For any other endpoint (a self-hosted
  Hub, a mirror, the tests' loopback server) xet storage is turned off, because xet only works against
  huggingface.co;
* offline: every download first passes :func:`require_hub`, which fails at once, in one line, when offline
  mode is on or the endpoint is unreachable (huggingface_hub alone retries for about 45 s); ``pull`` then
  uses the copy in the local cache when there is one.

Tokens never leave this module in a result, a model card or an error message: every error is turned
into a one-line :class:`HubError` with the token scrubbed out.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union
from urllib.parse import urlsplit

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_directory, load_model, read_config
from .errors import CheckpointError, DownloadError, InvalidArgumentError, StvitError, first_line

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MODEL_CARD_NAME = "README.md"
TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
# Evaluation results and training configuration that travel with the weights (top level of MODEL_DIR).
EXTRA_FILE_PATTERNS = (
    "results*.json", "results*.csv", "eval*.json", "eval*.csv", "metrics.csv", "metrics.jsonl",
    "summary.csv", "args.yaml", "config.yaml", "train_config.yaml", "training_args.yaml",
)
_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{6,}")
_HF_HOSTS = ("huggingface.co", "hf.co")


class HubError(DownloadError):
    """The Hub could not be reached, or refused a request (auth, missing repo or revision...)."""


@dataclass
class PushResult:
    repo_id: str
    url: str
    endpoint: str
    revision: str
    commit_oid: str
    commit_url: str
    pr_url: Optional[str]
    private: bool
    unchanged: bool  # the branch already had these exact files: no new commit was made
    files: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


@dataclass
class PullResult:
    repo_id: str
    endpoint: str
    revision: str
    commit_oid: Optional[str]
    path: str
    architecture: str
    num_params: int
    files: List[str] = field(default_factory=list)
    from_cache: bool = False  # offline or Hub unreachable: the copy in the local cache, the Hub was not asked

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --- endpoint, token, reachability ---------------------------------------------------------------------
def resolve_endpoint(endpoint: Optional[str] = None) -> str:
    """The Hub URL to talk to: ``endpoint``, else huggingface_hub's own (``HF_ENDPOINT``, read when it is imported)."""
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def is_huggingface_endpoint(endpoint: str) -> bool:
    host = (urlsplit(endpoint).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in _HF_HOSTS)


def disable_xet_unless_huggingface(endpoint: str) -> None:
    """Turn xet storage off for self-hosted endpoints (it only works against huggingface.co).

    huggingface_hub checks ``constants.HF_HUB_DISABLE_XET`` on every upload and download, so setting it here
    works whenever huggingface_hub was imported; the environment variable is set too, for child processes.
    """
    if is_huggingface_endpoint(endpoint):
        return
    os.environ["HF_HUB_DISABLE_XET"] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_DISABLE_XET = True


def resolve_token(token: Optional[str] = None) -> Optional[str]:
    """``token``, else ``HF_TOKEN``, else the saved login (huggingface_hub's own lookup order)."""
    if token:
        return token
    from huggingface_hub import get_token

    try:
        return get_token()
    except OSError as e:  # HF_HOME is a file, or the saved login is unreadable: there is no usable saved login
        _logger.debug("no saved Hugging Face login: %s", e)
        return None


def scrub(text: str, token: Optional[str] = None) -> str:
    """Remove a token (and anything that looks like a Hugging Face token) from a message."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)


def endpoint_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """A quick TCP connect to ``endpoint``'s host and port."""
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def require_hub(what: str, *, endpoint: Optional[str] = None, hint: str = "") -> str:
    """Fail at once, in one line, when the Hub cannot be used; returns the endpoint otherwise.

    Every download of stvit goes through here first (``load_model('hf-hub:...')``, pretrained timm weights,
    ``stvit convert``'s source weights, ``pull``): without it huggingface_hub retries for about 45 s when the
    network is down before failing with a generic message. Offline mode (``HF_HUB_OFFLINE=1``) is named as
    such. ``what`` names the download in the message, ``hint`` is appended to it.
    """
    from huggingface_hub import constants

    endpoint = resolve_endpoint(endpoint)
    reason = _hub_unusable(endpoint)
    if reason:
        not_cached = " and it is not in the local cache" if constants.HF_HUB_OFFLINE else ""
        raise DownloadError(f"cannot download {what}: {reason}{not_cached}{hint}")
    disable_xet_unless_huggingface(endpoint)
    return endpoint


def _hub_unusable(endpoint: str) -> Optional[str]:
    """Why the Hub cannot be used now (offline mode, endpoint unreachable), or None when it can."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    if not endpoint_reachable(endpoint):
        return f"cannot connect to {endpoint}, the Hub is unreachable (offline? check HF_ENDPOINT)"
    return None


def validate_repo_id(repo_id: str) -> None:
    """InvalidArgumentError for a malformed repo id, by huggingface_hub's own rules, before any cache or network."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate

    try:
        hf_validate(repo_id)
    except HFValidationError as e:
        raise InvalidArgumentError(f"invalid repo id: {first_line(e)}") from None


def require_hub_files(repo_id: str, needed: Sequence[Sequence[str]], *, revision: Optional[str] = None,
                      what: Optional[str] = None, hint: str = "") -> None:
    """:func:`require_hub`, unless the local cache already holds one file of every group in ``needed``."""
    from huggingface_hub import try_to_load_from_cache

    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
        except ValueError:  # a malformed repo id: let the download raise its own error
            return False

    if not all(any(cached(f) for f in group) for group in needed):
        require_hub(what or repo_id, hint=hint)


def require_pretrained_weights(model_name: str, hint: str = "") -> None:
    """:func:`require_hub_files` for the pretrained weights timm downloads for ``model_name`` from the Hub."""
    import timm

    try:
        repo_id = getattr(timm.models.get_pretrained_cfg(model_name), "hf_hub_id", None)
    except Exception:  # an unknown tag: timm raises its own error
        return
    if repo_id:  # weights at a plain URL (or none at all) are timm's business
        require_hub_files(repo_id, [(WEIGHTS_NAME, "pytorch_model.bin")],
                          what=f"pretrained weights for {model_name}", hint=hint)


# --- errors ---------------------------------------------------------------------------------------------
def _chain(e: Optional[BaseException]) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status_of(e: BaseException) -> Optional[int]:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _describe(e: BaseException, *, repo_id: str, revision: Optional[str], endpoint: str) -> str:
    """One line saying what went wrong, for any error huggingface_hub or its HTTP client raises."""
    from huggingface_hub import errors as hf

    chain = list(_chain(e))

    def find(*types: type) -> Optional[BaseException]:
        return next((x for x in chain if isinstance(x, types)), None)

    status = next((s for s in map(_status_of, chain) if s is not None), None)
    rev = revision or "main"
    if find(hf.OfflineModeIsEnabled):
        return f"offline mode is on (HF_HUB_OFFLINE=1), so {endpoint} is not contacted and {repo_id}@{rev} is not cached"
    if find(hf.LocalTokenNotFoundError):
        return "no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"
    # Transport failures: the HTTP client (requests, httpx...) wraps the socket error, which is a builtin.
    if find(ConnectionRefusedError, socket.gaierror):
        return f"cannot connect to {endpoint}: connection refused or host unreachable (check HF_ENDPOINT)"
    if find(TimeoutError):
        return f"timed out talking to {endpoint}"
    if find(hf.RevisionNotFoundError):
        return f"revision {rev!r} not found in {repo_id} (HTTP 404)"
    if status == 401 and not find(hf.RepositoryNotFoundError):
        return ("authentication failed (HTTP 401): the token is invalid or expired; pass --token, set HF_TOKEN "
                "or run `hf auth login`")
    if find(hf.RepositoryNotFoundError, hf.GatedRepoError):
        return (f"repository {repo_id} not found on {endpoint} (HTTP {status or 404}); if it is private, "
                "use a token that can read it")
    if find(hf.EntryNotFoundError) and status == 404:
        return f"a file is missing in {repo_id}@{rev} (HTTP 404)"
    if status == 403:
        return f"permission denied (HTTP 403): the token cannot write to {repo_id}"
    if status is not None:
        # huggingface_hub's own first line can be a bare "Bad request:"; the server's text says what was wrong
        server = next((m for m in (getattr(x, "server_message", None) for x in chain) if m), None)
        detail = first_line(server) if server else first_line(e).rstrip(":")
        return f"the Hub refused the request (HTTP {status}): {detail or 'no reason given'}"
    if find(hf.HTTPError, ConnectionError):  # no answer at all: the client's retries ran out
        return f"the connection to {endpoint} was dropped and retries did not help: {first_line(chain[-1])}"
    return f"{type(e).__name__}: {first_line(e)}"


@contextlib.contextmanager
def _hub_errors(action: str, *, repo_id: str, revision: Optional[str], endpoint: str,
                token: Optional[str]) -> Iterator[None]:
    """Turn anything raised while talking to the Hub into one scrubbed line."""
    from huggingface_hub.errors import HFValidationError

    try:
        yield
    except StvitError as e:
        raise type(e)(scrub(str(e), token)) from None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # huggingface_hub and its HTTP client raise many unrelated types
        _logger.debug("%s failed: %s", action, scrub(repr(e), token))
        if isinstance(e, HFValidationError):  # a malformed repo id or revision
            raise InvalidArgumentError(scrub(f"{action} failed: {first_line(e)}", token)) from None
        message = _describe(e, repo_id=repo_id, revision=revision, endpoint=endpoint)
        raise HubError(scrub(f"{action} failed: {message}", token)) from None


# --- model card -----------------------------------------------------------------------------------------
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
        from safetensors import safe_open

        total = 0
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                n = 1
                for dim in f.get_slice(key).get_shape():
                    n *= dim
                total += n
        return total
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
    from huggingface_hub import EvalResult

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
    from huggingface_hub import ModelCardData

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
    from huggingface_hub import ModelCard

    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    evaluation = read_eval_results(model_dir)
    values = _card_values(model_dir, cfg, repo_id, evaluation, list(files or []))
    card = ModelCard.from_template(_card_data(cfg, repo_id, evaluation), template_path=str(TEMPLATE_PATH), **values)
    return str(card)


# --- push and pull --------------------------------------------------------------------------------------
def _check_model_dir(model_dir: Path) -> Dict[str, Any]:
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory")
    cfg = read_config(model_dir)
    if not (model_dir / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{model_dir} is not a model directory: {WEIGHTS_NAME} is missing")
    return cfg


def _check_model_loads(model_dir: Path) -> None:
    """Never upload a model that does not load (truncated weights, config and weights that disagree...)."""
    try:
        load_model(model_dir)
    except StvitError as e:
        raise CheckpointError(f"refusing to push, the model does not load: {e}") from None


def _refuse_private_if_public(api: Any, repo_id: str) -> None:
    """``private=True`` only applies to a repo it creates: an existing public repo stays public, so say so."""
    if not api.repo_info(repo_id).private:
        raise InvalidArgumentError(f"private=True cannot apply: {repo_id} already exists and is public (change its "
                                   "visibility in the repo's settings on the Hub, or push without private=True)")


class _DropLogLines(logging.Filter):
    """Drop huggingface_hub log records that start with given text (ones the caller reports itself)."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


@contextlib.contextmanager
def _without_log_lines(logger_name: str, *prefixes: str) -> Iterator[None]:
    logger, drop = logging.getLogger(logger_name), _DropLogLines(*prefixes)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _refuse_token_in_files(paths: List[Path], card: str, token: Optional[str]) -> None:
    """Never publish the token: stop if it was written into a file that is about to be uploaded."""
    if not token:
        return
    needle = token.encode()
    if needle in card.encode():
        raise HubError("the model card contains the Hub token; refusing to upload it")
    for path in paths:
        if path.stat().st_size < 50 * 1024 * 1024 and needle in path.read_bytes():
            raise HubError(f"{path.name} contains the Hub token; refusing to upload it")


def push_to_hub(
    model_dir: PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    token: Optional[str] = None,
    create_pr: bool = False,
    endpoint: Optional[str] = None,
) -> PushResult:
    """Upload a model directory (config.json + model.safetensors) with a generated model card.

    Checks first that the directory's model loads. Creates the repo when needed (``private=True`` on an
    existing public repo is an error), creates branch ``revision`` from main when it does not exist yet, and
    commits config.json, model.safetensors, README.md (the directory's own README.md if it has one, else a
    generated card) and the evaluation / training files found by :func:`find_extra_files`, in one commit.
    Files that did not change are skipped by huggingface_hub, so pushing the same directory twice succeeds
    without a new commit (``unchanged``; with ``create_pr`` no pull request is opened then).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    model_dir = Path(model_dir)
    cfg = _check_model_dir(model_dir)
    validate_repo_id(repo_id)
    check_revision(revision)
    if create_pr and revision not in (None, "main"):
        raise InvalidArgumentError("--create-pr opens a pull request against main; do not combine it with --revision")
    _check_model_loads(model_dir)
    endpoint = resolve_endpoint(endpoint)
    disable_xet_unless_huggingface(endpoint)
    token = resolve_token(token)
    if not token:
        raise HubError("push-to-hub needs a Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")

    api = HfApi(endpoint=endpoint, token=token)
    extras = find_extra_files(model_dir)
    files = [model_dir / CONFIG_NAME, model_dir / WEIGHTS_NAME, *extras]
    with _hub_errors("push", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = repo_url.repo_id or repo_id
        if private:  # a repo created just now is private; a public one existed already
            _refuse_private_if_public(api, repo_id)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        own_card = model_dir / MODEL_CARD_NAME
        card = own_card.read_text() if own_card.is_file() else render_model_card(
            model_dir, repo_id, files=[p.name for p in extras])
        _refuse_token_in_files(files, card, token)
        operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
        operations.append(CommitOperationAdd(path_in_repo=MODEL_CARD_NAME, path_or_fileobj=card.encode()))
        message = commit_message or f"Upload {cfg['architecture']} with stvit"
        before = api.repo_info(repo_id, revision=revision)
        # An unchanged directory makes no commit (and no pull request); huggingface_hub logs that on stderr,
        # PushResult.unchanged reports it instead.
        with _without_log_lines("huggingface_hub.hf_api", "No files have been modified since last commit"):
            info = api.create_commit(repo_id, operations, commit_message=message, revision=revision,
                                     create_pr=create_pr)
    return PushResult(
        repo_id=repo_id,
        url=str(repo_url),
        endpoint=endpoint,
        revision=revision or "main",
        commit_oid=info.oid,
        commit_url=info.commit_url,
        pr_url=info.pr_url,
        private=bool(before.private),
        unchanged=info.oid == before.sha and not info.pr_url,
        files=sorted(op.path_in_repo for op in operations),
    )


def check_revision(revision: Optional[str], what: Optional[str] = None) -> None:
    """An empty (or blank) revision is an error, before anything touches the cache or the network:
    huggingface_hub would take it for a folder of the cache (``refs/``), or for main."""
    if revision is not None and not revision.strip():
        what = what or f"--revision {revision!r}"
        raise InvalidArgumentError(f"empty revision ({what}): name a branch, tag, commit or refs/pr/N, or leave it "
                                   "out for main")


def split_repo_spec(spec: str, revision: Optional[str] = None) -> "tuple[str, Optional[str]]":
    """``[hf-hub:]REPO_ID[@REV]`` and an optional separate revision -> ``(repo_id, revision)``; two different
    revisions, or an empty one, are an error."""
    original = spec
    if spec.startswith("hf-hub:"):
        spec = spec[len("hf-hub:"):]
    repo_id, at, at_revision = spec.partition("@")
    check_revision(revision)
    if at:
        check_revision(at_revision, f"nothing after @ in {original!r}")
        if revision and revision != at_revision:
            raise InvalidArgumentError(f"two revisions given: @{at_revision} and revision={revision}")
        revision = at_revision
    return repo_id, revision


def _cached_snapshot(repo_id: str, revision: Optional[str], reason: str) -> Path:
    """The snapshot of ``repo_id@revision`` in the local cache (huggingface_hub's own lookup, as for offline
    ``hf-hub:`` loads), for when the Hub cannot be used for ``reason``; one-line DownloadError when there is none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    what = f"{repo_id}@{revision}" if revision else repo_id
    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except IncompleteSnapshotError:
        raise DownloadError(f"cannot download {what}: {reason} and its copy in the local cache is incomplete "
                            "(files are missing)") from None
    except LocalEntryNotFoundError:
        raise DownloadError(f"cannot download {what}: {reason} and it is not in the local cache") from None


def _require_writable_cache() -> None:
    """Fail in one line when the Hugging Face cache cannot be written: huggingface_hub would log several
    "Ignored error while writing..." lines and then fail on the first download."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as e:
        raise StvitError(f"cannot write the Hugging Face cache {cache}: {e.strerror or first_line(e)} (set HF_HOME "
                         "or HF_HUB_CACHE to a writable folder, or pull with --output DIR)") from None


def pull_from_hub(
    repo_id: str,
    *,
    revision: Optional[str] = None,
    output_dir: Optional[PathLike] = None,
    token: Optional[str] = None,
    endpoint: Optional[str] = None,
    force: bool = False,
) -> PullResult:
    """Download a model repo into ``output_dir`` (or the Hugging Face cache) and check that it loads.

    With ``output_dir`` the files are downloaded next to it under a temporary name and renamed into place
    only once the model has loaded, so a failed pull never leaves a half-written directory. Offline
    (``HF_HUB_OFFLINE=1``) or with the Hub unreachable, the copy in the local cache is used (``from_cache``),
    and it is an error when there is none.
    """
    from huggingface_hub import HfApi, snapshot_download

    validate_repo_id(repo_id)
    check_revision(revision)
    if force and output_dir is None:
        raise InvalidArgumentError("force applies to output_dir only (the directory it replaces)")
    endpoint = resolve_endpoint(endpoint)

    def verify(path: Path) -> Any:
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{repo_id} is not a timm model repo: {CONFIG_NAME} is missing")
        try:
            return load_model(path)
        except StvitError as e:
            raise CheckpointError(f"{repo_id} was downloaded but does not load: {e}") from None

    unusable = _hub_unusable(endpoint)
    cached = _cached_snapshot(repo_id, revision, unusable) if unusable else None
    commit = cached.name if cached else None  # the snapshot folder is named after its commit
    if cached is None and output_dir is None:
        _require_writable_cache()
    token = resolve_token(token)
    kwargs = dict(repo_id=repo_id, endpoint=endpoint, token=token or False)
    if cached is None:
        disable_xet_unless_huggingface(endpoint)
        with _hub_errors("pull", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
            commit = HfApi(endpoint=endpoint, token=token or False).model_info(repo_id, revision=revision).sha
    if output_dir is not None:
        final = Path(output_dir)
        with atomic_directory(final, force=force) as tmp:
            if cached is not None:  # the cache holds symlinks to blobs: copy the files themselves
                shutil.copytree(cached, tmp, dirs_exist_ok=True)
            else:
                with _hub_errors("pull", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
                    snapshot_download(local_dir=str(tmp), revision=commit, **kwargs)  # exactly the commit reported
            model = verify(tmp)
        path = final
    else:
        path = cached
        if path is None:
            # by name, so that the cache records the branch for later (offline) hf-hub: loads
            with _hub_errors("pull", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
                path = Path(snapshot_download(revision=revision, **kwargs))
        model = verify(path)
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and ".cache" not in p.parts)
    return PullResult(
        repo_id=repo_id,
        endpoint=endpoint,
        revision=revision or "main",
        commit_oid=commit,
        path=str(path),
        architecture=read_config(path)["architecture"],
        num_params=sum(p.numel() for p in model.parameters()),
        files=files,
        from_cache=cached is not None,
    )
