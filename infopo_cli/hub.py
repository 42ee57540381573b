"""Local first, the hub on purpose: whether a name can only be a local path, and whether the Hugging Face hub can
be asked at all, answered in seconds, before a library spends half a minute retrying a name that was never a hub id.

Standard library only: the model loaders and the data readers ask it before importing anything heavy.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_ENDPOINT = "https://huggingface.co"
CONNECT_TIMEOUT_S = 3.0  # a reachable hub answers a TCP connect in well under a second
# A name ending so is a file, never a hub repository (whose names may hold dots: Qwen2.5-7B, phi-1.5).
FILE_SUFFIXES = frozenset({".gguf", ".safetensors", ".bin", ".pt", ".pth", ".json", ".jsonl", ".csv", ".tsv",
                           ".parquet", ".arrow", ".txt", ".toml", ".yaml", ".yml"})
# huggingface_hub's repo id: `name` or `namespace/name`, letters, digits, '-', '_', '.' (validate_repo_id).
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def looks_like_path(value: str) -> bool:
    """Whether `value` can only mean a local file or folder: it starts with ./ ../ / ~ (or a drive), ends in a file
    extension, has more parts than `org/name`, or its first part exists here (`data/prefs` beside a data/ folder)."""
    if value.startswith(("./", "../", "/", "~", ".\\", "..\\")) or value in (".", "..") or "\\" in value:
        return True
    if re.match(r"[A-Za-z]:[\\/]", value) or Path(value).suffix.lower() in FILE_SUFFIXES:
        return True
    if value.count("/") > 1 or not REPO_ID.fullmatch(value):
        return True
    return "/" in value and os.path.lexists(value.split("/", 1)[0])


def endpoint() -> str:
    """The hub huggingface_hub talks to: HF_ENDPOINT, else huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> str | None:
    """The variable that keeps the hub from being asked, if one is set: HF_HUB_OFFLINE, or transformers' older
    TRANSFORMERS_OFFLINE (both honoured by huggingface_hub)."""
    return next((name for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
                 if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}), None)


def _connect_target() -> tuple[str, int, str]:
    """(host, port, what) that a request to the hub connects to first: the hub itself, or the proxy in between."""
    url = urlsplit(endpoint())
    host, port = url.hostname or "", url.port or (80 if url.scheme == "http" else 443)
    proxy = urllib.request.getproxies().get(url.scheme or "https")
    if proxy and not urllib.request.proxy_bypass(host):
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if via.hostname:
            return via.hostname, via.port or 8080, f"the proxy {via.hostname}:{via.port or 8080}"
    return host, port, f"{host}:{port}"


def unreachable(timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to the hub (or its proxy) opens within `timeout` seconds, else why not."""
    return _probe(*_connect_target(), timeout)


@functools.lru_cache(maxsize=8)
def _probe(host: str, port: int, what: str, timeout: float) -> str | None:
    """Asked once per target and process. The connect runs in a daemon thread because a name lookup ignores socket
    timeouts and can block for tens of seconds; a thread left waiting on the resolver costs no CPU and ends with
    the process."""
    if not host:
        return f"HF_ENDPOINT {endpoint()} names no host"
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(f"cannot connect to {what} ({err.strerror or err})")

    thread = threading.Thread(target=connect, name="infopo-hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer from {what} within {timeout:g} s"


def hub_problem() -> str | None:
    """None when the hub can be asked; else a clause for a one-line error about a name that is not local, saying
    that the hub was tried (or, with HF_HUB_OFFLINE, deliberately not)."""
    if variable := offline():
        return f"{variable} is set, so the hub is not asked"
    problem = unreachable()
    return f"tried the hub at {endpoint()}: {problem}" if problem else None
