"""Offline fails fast: one short connection attempt to the model hub before a hub name is loaded, and
offline mode (`HF_HUB_OFFLINE=1`, the local cache only) when it fails.

Why: without a network, huggingface_hub retries each request with backoff (`Retrying in 1s [Retry
1/5]` ... about a minute of retry lines for one timm name) before the model builder's clear error
can say to use a local path. With offline mode on, the same libraries answer from the cache at once
and raise, and the builders (vision.py, hf.py, ...) turn that into their message. A model already in
the cache still loads.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from urllib.parse import urlparse

log = logging.getLogger("mmtune")

TRUE = ("1", "true", "yes", "on")
PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def go_offline() -> None:
    """Offline mode for this process and the processes it starts (huggingface_hub reads the variable
    at import, so an already imported hub is switched too)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if "huggingface_hub.constants" in sys.modules:
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to the hub endpoint (HF_ENDPOINT), no retries. Behind a proxy the direct
    connection says nothing, so the libraries are left to try."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError as err:
        log.warning("[mmtune] the model hub (%s) cannot be reached (%s): working offline, from the local "
                    "cache only (HF_HUB_OFFLINE=1)", url.hostname, err.strerror or type(err).__name__)
        return False


def offline_unless_reachable() -> bool:
    """True when the hub is not to be used: offline mode already set, or set now because one
    connection attempt failed."""
    if hub_offline():
        go_offline()  # the variable may have been set after huggingface_hub was imported
        return True
    if hub_reachable():
        return False
    go_offline()
    return True


def names_hub_models(config) -> bool:
    """Whether a config (nested dicts/Namespaces) names a model that is not a local path: a dict with
    ModelSpec's `name` and `pretrained` keys whose name is no existing file or folder."""
    stack = [config]
    while stack:
        node = stack.pop()
        if hasattr(node, "as_dict"):
            node = node.as_dict()
        if isinstance(node, dict):
            name = node.get("name")
            if "pretrained" in node and isinstance(name, str) and name and not os.path.exists(os.path.expanduser(name)):
                return True
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return False
