"""Sharing models on the Hugging Face Hub: push a model directory, pull it back, write its model card.

Everything goes through ``huggingface_hub`` (``create_repo``, ``create_commit``, ``snapshot_download``),
so authentication, retries, LFS and caching behave exactly as for any other Hub library:

* token: the explicit ``token`` argument, else ``HF_TOKEN``, else the login saved by ``hf auth login``;
* endpoint: the explicit ``endpoint`` argument, else ``HF_ENDPOINT``, else https://huggingface.co.
  For any other endpoint (a self-hosted Hub, a mirror, the tests' loopback server) xet storage is turned
  off, because xet uploads only work against huggingface.co. ``stvit_cli`` also sets
  ``HF_HUB_DISABLE_XET=1`` when it is imported, before huggingface_hub reads its environment.

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
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union
from urllib.parse import urlsplit

import yaml

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, atomic_directory, load_model, read_config
from .errors import CheckpointError, DownloadError, InvalidArgumentError, StvitError

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
DEFAULT_ENDPOINT = "https://huggingface.co"
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

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# --- endpoint and token ---------------------------------------------------------------------------------
def resolve_endpoint(endpoint: Optional[str] = None) -> str:
    """The Hub URL to talk to: ``endpoint``, else ``HF_ENDPOINT``, else huggingface.co (no trailing /)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def is_huggingface_endpoint(endpoint: str) -> bool:
    host = (urlsplit(endpoint).hostname or "").lower()
    return any(host == h or host.endswith("." + h) for h in _HF_HOSTS)


def disable_xet_unless_huggingface(endpoint: str) -> None:
    """Turn xet storage off for self-hosted endpoints (it only works against huggingface.co).

    huggingface_hub reads ``HF_HUB_DISABLE_XET`` when it is imported; its upload and download code then
    checks ``huggingface_hub.constants.HF_HUB_DISABLE_XET`` on every call, so setting both here also
    works when huggingface_hub was imported earlier (timm imports it).
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

    return get_token()


def scrub(text: str, token: Optional[str] = None) -> str:
    """Remove a token (and anything that looks like a Hugging Face token) from a message."""
    if token:
        text = text.replace(token, "***")
    return _TOKEN_PATTERN.sub("hf_***", text)


# --- errors ---------------------------------------------------------------------------------------------
def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _class_names(e: BaseException) -> set:
    return {cls.__name__ for cls in type(e).__mro__}


def _status_of(e: BaseException) -> Optional[int]:
    response = getattr(e, "response", None)
    return getattr(response, "status_code", None)


def _describe(e: BaseException, *, repo_id: str, revision: Optional[str], endpoint: str) -> str:
    """One line saying what went wrong, for any error huggingface_hub or its HTTP client raises."""
    chain = list(_chain(e))
    names = set().union(*(_class_names(x) for x in chain))
    status = next((s for s in map(_status_of, chain) if s is not None), None)
    rev = revision or "main"
    # Connection problems first: huggingface_hub wraps them (e.g. in LocalEntryNotFoundError).
    if names & {"ConnectError", "ConnectionError", "ConnectTimeout", "NewConnectionError"}:
        return f"cannot connect to {endpoint}: connection refused or host unreachable (check HF_ENDPOINT)"
    if names & {"TimeoutException", "Timeout", "ReadTimeout"}:
        return f"timed out talking to {endpoint}"
    if "OfflineModeIsEnabled" in names:
        return f"HF_HUB_OFFLINE is set, so {endpoint} is not contacted (and {repo_id}@{rev} is not cached)"
    if "RevisionNotFoundError" in names:
        return f"revision {rev!r} not found in {repo_id} (HTTP 404)"
    if "LocalTokenNotFoundError" in names:
        return "no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"
    if status == 401 and "RepositoryNotFoundError" not in names:
        return ("authentication failed (HTTP 401): the token is invalid or expired; pass --token, set HF_TOKEN "
                "or run `hf auth login`")
    if "RepositoryNotFoundError" in names or "GatedRepoError" in names:
        return (f"repository {repo_id} not found on {endpoint} (HTTP {status or 404}); if it is private, "
                "use a token that can read it")
    if "RemoteEntryNotFoundError" in names or ("EntryNotFoundError" in names and status == 404):
        return f"a file is missing in {repo_id}@{rev} (HTTP 404)"
    if status == 403:
        return f"permission denied (HTTP 403): the token cannot write to {repo_id}"
    if names & {"RemoteProtocolError", "NetworkError", "ChunkedEncodingError"}:
        return f"the connection to {endpoint} was dropped and retries did not help: {_first_line(chain[-1])}"
    if status is not None:
        return f"the Hub refused the request (HTTP {status}): {_first_line(e)}"
    return f"{type(e).__name__}: {_first_line(e)}"


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


@contextlib.contextmanager
def _hub_errors(action: str, *, repo_id: str, revision: Optional[str], endpoint: str,
                token: Optional[str]) -> Iterator[None]:
    """Turn anything raised while talking to the Hub into one scrubbed line."""
    try:
        yield
    except StvitError as e:
        raise type(e)(scrub(str(e), token)) from None
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # huggingface_hub and its HTTP client raise many unrelated types
        _logger.debug("%s failed: %s", action, scrub(repr(e), token))
        if "HFValidationError" in _class_names(e):  # a malformed repo id or revision
            raise InvalidArgumentError(scrub(f"{action} failed: {_first_line(e)}", token)) from None
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
                return {"top1": _pick(record, _TOP1_KEYS), "top5": _pick(record, _TOP5_KEYS),
                        "dataset": record.get("dataset") or outer.get("dataset"),
                        "file": path.name}
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


def _base_model_id(source: Optional[str]) -> Optional[str]:
    """A Hub id for the source model: timm names become ``timm/NAME``, ``hf-hub:`` prefixes are dropped."""
    if not source:
        return None
    source = str(source)
    for prefix in ("hf-hub:", "hf_hub:", "timm:"):
        if source.startswith(prefix):
            source = source[len(prefix):]
    source = source.split("@")[0]
    if os.sep in source and Path(source).exists():
        return None  # a local directory is not a Hub model
    return source if "/" in source else f"timm/{source}"


def _datasets(meta: Dict[str, Any], pretrained_cfg: Dict[str, Any], evaluation: Optional[dict]) -> List[str]:
    if meta.get("datasets"):
        value = meta["datasets"]
        return [value] if isinstance(value, str) else list(value)
    if meta.get("dataset"):
        return [str(meta["dataset"])]
    if evaluation and evaluation.get("dataset"):
        return [str(evaluation["dataset"])]
    tag = str(meta.get("source_model") or pretrained_cfg.get("tag") or "")
    if "in22k" in tag or "in21k" in tag:
        return ["imagenet-21k"] + (["imagenet-1k"] if "in1k" in tag else [])
    if "in1k" in tag:
        return ["imagenet-1k"]
    return []


def _fmt(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None or value == "":
        return "n/a"
    try:
        return f"{float(value):.{digits}f}{suffix}"
    except (TypeError, ValueError):
        return str(value)


def render_model_card(model_dir: PathLike, repo_id: str, *, files: Optional[List[str]] = None) -> str:
    """The README.md for ``model_dir``: Hub front matter + a body from ``templates/model_card.md``."""
    model_dir = Path(model_dir)
    cfg = read_config(model_dir)
    meta = dict(cfg.get("stvit") or {})
    pretrained_cfg = dict(cfg.get("pretrained_cfg") or {})
    evaluation = read_eval_results(model_dir)
    architecture = cfg["architecture"]
    base_model = _base_model_id(meta.get("source_model"))
    license_ = meta.get("license") or pretrained_cfg.get("license") or "other"
    datasets = _datasets(meta, pretrained_cfg, evaluation)

    front: Dict[str, Any] = {"library_name": "timm", "license": str(license_).lower(),
                             "tags": ["image-classification", "timm", "stvit"]}
    if datasets:
        front["datasets"] = datasets
    if base_model:
        front["base_model"] = base_model
    if evaluation:
        metrics = [{"type": "accuracy", "value": round(evaluation["top1"], 3), "name": "Top-1 accuracy"}]
        if evaluation.get("top5") is not None:
            metrics.append({"type": "accuracy", "value": round(evaluation["top5"], 3), "name": "Top-5 accuracy"})
        dataset = (datasets or ["unknown"])[0]
        front["model-index"] = [{"name": repo_id.split("/")[-1], "results": [{
            "task": {"type": "image-classification", "name": "Image Classification"},
            "dataset": {"type": dataset, "name": dataset},
            "metrics": metrics}]}]

    params = meta.get("params_m")
    if params is None:
        count = _count_params(model_dir / WEIGHTS_NAME)
        params = count / 1e6 if count is not None else None
    gflops, base_gflops = meta.get("gflops"), meta.get("base_gflops")
    speedup_parts = []
    if gflops and base_gflops:
        speedup_parts.append(f"{float(base_gflops) / float(gflops):.2f}x fewer FLOPs")
    if meta.get("speedup"):
        speedup_parts.append(f"{float(meta['speedup']):.2f}x measured throughput")
    input_size = pretrained_cfg.get("input_size") or [3, 224, 224]
    tokens = meta.get("num_semantic_tokens") or (cfg.get("model_args") or {}).get("num_semantic_tokens")
    base_params = meta.get("base_params_m")

    if evaluation:
        top5 = f", top-5 {evaluation['top5']:.2f}%" if evaluation.get("top5") is not None else ""
        on = f" on {evaluation['dataset']}" if evaluation.get("dataset") else ""
        evaluation_text = f"Top-1 {evaluation['top1']:.2f}%{top5}{on} (from `{evaluation['file']}`)."
    else:
        evaluation_text = "No evaluation results were found next to the weights."
    summary = (f"An STViT model (semantic tokens, CVPR 2023) converted from `{meta['source_model']}`."
               if meta.get("source_model") else "A timm image classification model shared with stvit.")
    file_list = sorted(set((files or []) + [CONFIG_NAME, WEIGHTS_NAME, MODEL_CARD_NAME]))
    values = {
        "front_matter": yaml.safe_dump(front, sort_keys=False, default_flow_style=False).strip(),
        "title": f"Model card for {repo_id.split('/')[-1]}",
        "summary": summary,
        "architecture": architecture,
        "base_model": f"[{base_model}](https://huggingface.co/{base_model})" if base_model else "n/a",
        "num_semantic_tokens": tokens if tokens is not None else "n/a",
        "params": _fmt(params, 2, "M") + (f" (base {_fmt(base_params, 2, 'M')})" if base_params else ""),
        "input_size": "x".join(str(v) for v in input_size[-2:]),
        "gflops": _fmt(gflops),
        "base_gflops": _fmt(base_gflops),
        "speedup": ", ".join(speedup_parts) or "n/a",
        "num_classes": cfg.get("num_classes", "n/a"),
        "evaluation": evaluation_text,
        "repo_id": repo_id,
        "name": repo_id.split("/")[-1],
        "files": "\n".join(f"- `{name}`" for name in file_list),
    }
    return string.Template(TEMPLATE_PATH.read_text()).substitute(values)


# --- push and pull --------------------------------------------------------------------------------------
def _check_model_dir(model_dir: Path) -> Dict[str, Any]:
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir} is not a directory")
    cfg = read_config(model_dir)
    if not (model_dir / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{model_dir} is not a model directory: {WEIGHTS_NAME} is missing")
    return cfg


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

    Creates the repo when needed (``private`` only applies then), creates branch ``revision`` from main
    when it does not exist yet, and commits config.json, model.safetensors, README.md (the directory's own
    README.md if it has one, else a generated card) and the evaluation / training files found by
    :func:`find_extra_files`, in one commit. Files that did not change are skipped by huggingface_hub,
    so pushing the same directory twice succeeds without a new commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    model_dir = Path(model_dir)
    cfg = _check_model_dir(model_dir)
    endpoint = resolve_endpoint(endpoint)
    disable_xet_unless_huggingface(endpoint)
    token = resolve_token(token)
    if not token:
        raise HubError("push-to-hub needs a Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")
    if create_pr and revision not in (None, "main"):
        raise StvitError("--create-pr opens a pull request against main; do not combine it with --revision")

    api = HfApi(endpoint=endpoint, token=token)
    extras = find_extra_files(model_dir)
    files = [model_dir / CONFIG_NAME, model_dir / WEIGHTS_NAME, *extras]
    with _hub_errors("push", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = repo_url.repo_id or repo_id
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
        unchanged=info.oid == before.sha and not create_pr,
        files=sorted(op.path_in_repo for op in operations),
    )


def _commit_of_local_dir(path: Path) -> Optional[str]:
    """The commit huggingface_hub recorded for a ``local_dir`` download (first line of its metadata)."""
    meta = path / ".cache" / "huggingface" / "download" / f"{CONFIG_NAME}.metadata"
    with contextlib.suppress(OSError, IndexError):
        return meta.read_text().splitlines()[0].strip() or None
    return None


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
    only once the model has loaded, so a failed pull never leaves a half-written directory.
    """
    from huggingface_hub import snapshot_download

    endpoint = resolve_endpoint(endpoint)
    disable_xet_unless_huggingface(endpoint)
    token = resolve_token(token)
    kwargs = dict(repo_id=repo_id, revision=revision, endpoint=endpoint, token=token or False)

    def verify(path: Path) -> Any:
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{repo_id} is not a timm model repo: {CONFIG_NAME} is missing")
        try:
            return load_model(path)
        except StvitError as e:
            raise CheckpointError(f"{repo_id} was downloaded but does not load: {e}") from None

    if output_dir is not None:
        final = Path(output_dir)
        with atomic_directory(final, force=force) as tmp:
            with _hub_errors("pull", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
                snapshot_download(local_dir=str(tmp), **kwargs)
            model = verify(tmp)
            commit = _commit_of_local_dir(tmp)
        path = final
    else:
        with _hub_errors("pull", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
            path = Path(snapshot_download(**kwargs))
        model = verify(path)
        commit = path.name if re.fullmatch(r"[0-9a-f]{40}", path.name) else None
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
    )
