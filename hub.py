"""
The Hugging Face Hub, asked once whether it can be reached. Without this probe a machine with no network spends
~30 s in huggingface_hub's retries (5 of them, each printing two lines) before the one-line error; with it, an
unreachable hub is known after one connection attempt (DNS failure: milliseconds; a silent firewall: --timeout),
and the loaders go straight to the local cache (local_files_only) and to their one-line error.
"""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


@lru_cache(maxsize=1)
def unreachable() -> str | None:
    """None if the hub may be used, else why it cannot ("HF_HUB_OFFLINE=1", "cannot connect to huggingface.co ...").
    Behind an HTTPS proxy the direct probe says nothing, so it is skipped and huggingface_hub decides."""
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1"
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"cannot connect to {host}: {e.strerror or type(e).__name__}"
    return None
