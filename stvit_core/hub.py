"""Sharing models on the Hugging Face Hub: push a model directory with its model card, pull it back.

Everything goes through ``huggingface_hub`` (``create_repo``, ``create_commit``, ``snapshot_download``), so
authentication, retries, LFS and caching behave exactly as for any other Hub library. Endpoint, token, offline
checks and one-line errors come from :mod:`stvit_core.hub_access`, the card from :mod:`stvit_core.model_card`.
Offline (``HF_HUB_OFFLINE=1``) or with the Hub unreachable, ``pull`` uses the copy in the local cache when there
is one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from huggingface_hub import CommitOperationAdd, HfApi, constants, snapshot_download
from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_saved_model, read_config
from .errors import CheckpointError, DownloadError, InvalidArgumentError, StvitError, first_line
from .files import atomic_directory
from .hub_access import (
    HubError,
    check_revision,
    disable_xet_unless_huggingface,
    hub_errors,
    hub_unusable,
    resolve_endpoint,
    resolve_token,
    validate_repo_id,
)
from .model_card import MODEL_CARD_NAME, find_extra_files, render_model_card

PathLike = Union[str, os.PathLike]


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


# --- push -----------------------------------------------------------------------------------------------
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
        load_saved_model(model_dir)
    except StvitError as e:
        raise CheckpointError(f"refusing to push, the model does not load: {e}") from None


def _refuse_private_if_public(api: Any, repo_id: str) -> None:
    """``private=True`` only applies to a repo it creates: an existing public repo stays public, so say so."""
    if not api.repo_info(repo_id).private:
        raise InvalidArgumentError(f"{{private=}} cannot apply: {repo_id} already exists and is public (change its "
                                   "visibility in the repo's settings on the Hub, or push without {private=})",
                                   private=True)


@contextlib.contextmanager
def _without_log_lines(logger_name: str, *prefixes: str) -> Iterator[None]:
    """Drop the log records of ``logger_name`` that start with ``prefixes`` (ones the caller reports itself)."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefixes)

    logger = logging.getLogger(logger_name)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


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
    model_dir = Path(model_dir)
    cfg = _check_model_dir(model_dir)
    validate_repo_id(repo_id)
    check_revision(revision)
    if create_pr and revision not in (None, "main"):
        raise InvalidArgumentError("{create_pr} opens a pull request against main; do not combine it with {revision}",
                                   create_pr=True, revision=revision)
    _check_model_loads(model_dir)
    endpoint = resolve_endpoint(endpoint)
    disable_xet_unless_huggingface(endpoint)
    token = resolve_token(token)
    if not token:
        raise HubError("push-to-hub needs a Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")

    api = HfApi(endpoint=endpoint, token=token)
    extras = find_extra_files(model_dir)
    files = [model_dir / CONFIG_NAME, model_dir / WEIGHTS_NAME, *extras]
    with hub_errors("push", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
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
        # create_commit rather than upload_folder: a generated card is no file of model_dir, and only these files go
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


def _cached_snapshot(repo_id: str, revision: Optional[str], reason: str) -> Path:
    """The snapshot of ``repo_id@revision`` in the local cache (huggingface_hub's own lookup, as for offline
    ``hf-hub:`` loads), for when the Hub cannot be used for ``reason``; one-line DownloadError when there is none."""
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
    validate_repo_id(repo_id)
    check_revision(revision)
    if force and output_dir is None:
        raise InvalidArgumentError("{force} applies to {output_dir} only (the directory it replaces)",
                                   force=True, output_dir=None)
    endpoint = resolve_endpoint(endpoint)

    def verify(path: Path) -> Any:
        if not (path / CONFIG_NAME).is_file():
            raise CheckpointError(f"{repo_id} is not a timm model repo: {CONFIG_NAME} is missing")
        try:
            return load_saved_model(path)
        except StvitError as e:
            raise CheckpointError(f"{repo_id} was downloaded but does not load: {e}") from None

    unusable = hub_unusable(endpoint)
    cached = _cached_snapshot(repo_id, revision, unusable) if unusable else None
    commit = cached.name if cached else None  # the snapshot folder is named after its commit
    if cached is None and output_dir is None:
        _require_writable_cache()
    token = resolve_token(token)
    kwargs = dict(repo_id=repo_id, endpoint=endpoint, token=token or False)
    if cached is None:
        disable_xet_unless_huggingface(endpoint)
        with hub_errors("pull", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
            commit = HfApi(endpoint=endpoint, token=token or False).model_info(repo_id, revision=revision).sha
    if output_dir is not None:
        final = Path(output_dir)
        with atomic_directory(final, force=force) as tmp:
            if cached is not None:  # the cache holds symlinks to blobs: copy the files themselves
                shutil.copytree(cached, tmp, dirs_exist_ok=True)
            else:
                with hub_errors("pull", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
                    snapshot_download(local_dir=str(tmp), revision=commit, **kwargs)  # exactly the commit reported
            model = verify(tmp)
        path = final
    else:
        path = cached
        if path is None:
            # by name, so that the cache records the branch for later (offline) hf-hub: loads
            with hub_errors("pull", repo_id=repo_id, revision=revision, endpoint=endpoint, token=token):
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
