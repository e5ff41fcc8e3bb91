"""Access to the Hugging Face Hub: repo specs, offline and reachability checks, Hub errors as one line.

The low layer under every download (``load_model('hf-hub:...')``, timm's pretrained weights, ``stvit convert``'s
source weights, ``pull``) and under push. It knows nothing of stvit's model format, so checkpoint and convert can
import it.

* endpoint: the explicit ``endpoint`` argument, else huggingface_hub's ``constants.ENDPOINT`` (``HF_ENDPOINT``,
  read when huggingface_hub is imported), else https://huggingface.co. For any other endpoint (a self-hosted
  Hub, a mirror, the tests' loopback server) xet storage is turned off, because xet only works against
  huggingface.co;
* token: the explicit ``token`` argument, else ``HF_TOKEN``, else the login saved by ``hf auth login``;
* offline: :func:`require_hub` fails at once, in one line, when offline mode is on or the endpoint is
  unreachable (huggingface_hub alone retries for about 45 s).

Tokens never leave this layer in an error message: :func:`hub_errors` turns anything huggingface_hub raises into
a one-line :class:`HubError` with the token scrubbed out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from typing import Iterator, Optional, Sequence, Tuple
from urllib.parse import urlsplit

import huggingface_hub
import timm
from huggingface_hub import constants, try_to_load_from_cache
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import validate_repo_id as hf_validate_repo_id

from .errors import DownloadError, InvalidArgumentError, StvitError, first_line

_logger = logging.getLogger(__name__)

_TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{6,}")
_HF_HOSTS = ("huggingface.co", "hf.co")


class HubError(DownloadError):
    """The Hub could not be reached, or refused a request (auth, missing repo or revision...)."""


# --- repo specs -----------------------------------------------------------------------------------------
def validate_repo_id(repo_id: str) -> None:
    """InvalidArgumentError for a malformed repo id, by huggingface_hub's own rules, before any cache or network."""
    try:
        hf_validate_repo_id(repo_id)
    except hf_errors.HFValidationError as e:
        raise InvalidArgumentError(f"invalid repo id: {first_line(e)}") from None


def check_revision(revision: Optional[str], what: Optional[str] = None) -> None:
    """An empty (or blank) revision is an error, before anything touches the cache or the network:
    huggingface_hub would take it for a folder of the cache (``refs/``), or for main."""
    if revision is not None and not revision.strip():
        what = what or f"--revision {revision!r}"
        raise InvalidArgumentError(f"empty revision ({what}): name a branch, tag, commit or refs/pr/N, or leave it "
                                   "out for main")


def split_repo_spec(spec: str, revision: Optional[str] = None) -> Tuple[str, Optional[str]]:
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
            raise InvalidArgumentError(f"two revisions given: @{at_revision} and {{revision=}}", revision=revision)
        revision = at_revision
    return repo_id, revision


# --- endpoint, token, reachability ---------------------------------------------------------------------
def resolve_endpoint(endpoint: Optional[str] = None) -> str:
    """The Hub URL to talk to: ``endpoint``, else huggingface_hub's own (``HF_ENDPOINT``, read when it is imported)."""
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
    constants.HF_HUB_DISABLE_XET = True


def resolve_token(token: Optional[str] = None) -> Optional[str]:
    """``token``, else ``HF_TOKEN``, else the saved login (huggingface_hub's own lookup order)."""
    if token:
        return token
    try:
        return huggingface_hub.get_token()
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


def hub_unusable(endpoint: str) -> Optional[str]:
    """Why the Hub cannot be used now (offline mode, endpoint unreachable), or None when it can."""
    if constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE=1)"
    if not endpoint_reachable(endpoint):
        return f"cannot connect to {endpoint}, the Hub is unreachable (offline? check HF_ENDPOINT)"
    return None


def require_hub(what: str, *, endpoint: Optional[str] = None, hint: str = "") -> str:
    """Fail at once, in one line, when the Hub cannot be used; returns the endpoint otherwise.

    Without it huggingface_hub retries for about 45 s when the network is down before failing with a generic
    message. Offline mode (``HF_HUB_OFFLINE=1``) is named as such. ``what`` names the download in the message,
    ``hint`` is appended to it.
    """
    endpoint = resolve_endpoint(endpoint)
    reason = hub_unusable(endpoint)
    if reason:
        not_cached = " and it is not in the local cache" if constants.HF_HUB_OFFLINE else ""
        raise DownloadError(f"cannot download {what}: {reason}{not_cached}{hint}")
    disable_xet_unless_huggingface(endpoint)
    return endpoint


def require_hub_files(repo_id: str, needed: Sequence[Sequence[str]], *, revision: Optional[str] = None,
                      what: Optional[str] = None, hint: str = "") -> None:
    """:func:`require_hub`, unless the local cache already holds one file of every group in ``needed``."""
    def cached(filename: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
        except ValueError:  # a malformed repo id: let the download raise its own error
            return False

    if not all(any(cached(f) for f in group) for group in needed):
        require_hub(what or repo_id, hint=hint)


def require_pretrained_weights(model_name: str, hint: str = "") -> None:
    """:func:`require_hub_files` for the pretrained weights timm downloads for ``model_name`` from the Hub."""
    try:
        repo_id = getattr(timm.models.get_pretrained_cfg(model_name), "hf_hub_id", None)
    except Exception:  # an unknown tag: timm raises its own error
        return
    if repo_id:  # weights at a plain URL (or none at all) are timm's business
        require_hub_files(repo_id, [(constants.SAFETENSORS_SINGLE_FILE, constants.PYTORCH_WEIGHTS_NAME)],
                          what=f"pretrained weights for {model_name}", hint=hint)


# --- errors ---------------------------------------------------------------------------------------------
def _chain(e: Optional[BaseException]) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def describe_hub_error(e: BaseException, *, repo_id: str, revision: Optional[str], endpoint: str) -> str:
    """One line saying what went wrong, for any error huggingface_hub or its HTTP client raises."""
    chain = list(_chain(e))

    def find(*types: type) -> Optional[BaseException]:
        return next((x for x in chain if isinstance(x, types)), None)

    statuses = (getattr(getattr(x, "response", None), "status_code", None) for x in chain)
    status = next((s for s in statuses if s is not None), None)
    rev = revision or "main"
    if find(hf_errors.OfflineModeIsEnabled):
        return f"offline mode is on (HF_HUB_OFFLINE=1), so {endpoint} is not contacted and {repo_id}@{rev} is not cached"
    if find(hf_errors.LocalTokenNotFoundError):
        return "no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`"
    # Transport failures: the HTTP client (requests, httpx...) wraps the socket error, which is a builtin.
    if find(ConnectionRefusedError, socket.gaierror):
        return f"cannot connect to {endpoint}: connection refused or host unreachable (check HF_ENDPOINT)"
    if find(TimeoutError):
        return f"timed out talking to {endpoint}"
    if find(hf_errors.RevisionNotFoundError):
        return f"revision {rev!r} not found in {repo_id} (HTTP 404)"
    if status == 401 and not find(hf_errors.RepositoryNotFoundError):
        return ("authentication failed (HTTP 401): the token is invalid or expired; pass --token, set HF_TOKEN "
                "or run `hf auth login`")
    if find(hf_errors.RepositoryNotFoundError, hf_errors.GatedRepoError):
        return (f"repository {repo_id} not found on {endpoint} (HTTP {status or 404}); if it is private, "
                "use a token that can read it")
    if find(hf_errors.EntryNotFoundError) and status == 404:
        return f"a file is missing in {repo_id}@{rev} (HTTP 404)"
    if status == 403:
        return f"permission denied (HTTP 403): the token cannot write to {repo_id}"
    if status is not None:
        # huggingface_hub's own first line can be a bare "Bad request:"; the server's text says what was wrong
        server = next((m for m in (getattr(x, "server_message", None) for x in chain) if m), None)
        detail = first_line(server) if server else first_line(e).rstrip(":")
        return f"the Hub refused the request (HTTP {status}): {detail or 'no reason given'}"
    if find(hf_errors.HTTPError, ConnectionError):  # no answer at all: the client's retries ran out
        return f"the connection to {endpoint} was dropped and retries did not help: {first_line(chain[-1])}"
    return f"{type(e).__name__}: {first_line(e)}"


@contextlib.contextmanager
def hub_errors(action: str, *, repo_id: str, revision: Optional[str], endpoint: str,
               token: Optional[str]) -> Iterator[None]:
    """Turn anything raised while talking to the Hub into one scrubbed line."""
    try:
        yield
    except StvitError as e:
        scrubbed = scrub(str(e), token)
        if scrubbed != str(e):  # rebuilt without the token (as a plain message: its fields go too)
            raise type(e)(scrubbed) from None
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # huggingface_hub and its HTTP client raise many unrelated types
        _logger.debug("%s failed: %s", action, scrub(repr(e), token))
        if isinstance(e, hf_errors.HFValidationError):  # a malformed repo id or revision
            raise InvalidArgumentError(scrub(f"{action} failed: {first_line(e)}", token)) from None
        message = describe_hub_error(e, repo_id=repo_id, revision=revision, endpoint=endpoint)
        raise HubError(scrub(f"{action} failed: {message}", token)) from None
