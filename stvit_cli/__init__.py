"""The ``stvit`` command line: thin wrappers that parse, call :mod:`stvit_core` and print."""

import os as _os
from urllib.parse import urlsplit as _urlsplit


def _disable_xet_for_self_hosted_hub() -> None:
    """xet uploads only work against huggingface.co; huggingface_hub reads HF_HUB_DISABLE_XET at import.

    So when HF_ENDPOINT names another server, set it here, before anything imports huggingface_hub.
    """
    host = (_urlsplit(_os.environ.get("HF_ENDPOINT", "")).hostname or "").lower()
    if host and not any(host == h or host.endswith("." + h) for h in ("huggingface.co", "hf.co")):
        _os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


_disable_xet_for_self_hosted_hub()
