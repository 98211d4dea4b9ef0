"""Decide a W&B run's mode before it starts: never block or kill training over W&B.

``WANDB_MODE`` in the environment decides when set (``online``, ``offline``, ``disabled``;
``dryrun`` is W&B's old name for offline, ``run`` for online). Otherwise the logger's ``offline``
option decides, and an online run first checks, within seconds, that it can work:

* an API key: ``WANDB_API_KEY``, or the ``~/.netrc`` entry (``$NETRC``) for the W&B host that
  ``wandb login`` writes;
* the host (``WANDB_BASE_URL``, default ``https://api.wandb.ai``) accepts a TCP connection.

Without either, the run goes offline with one line that says why and how to upload it later
(``wandb sync``), instead of W&B's prompt, traceback, or ~110 s of retries. These two checks are
hand-written (stdlib ``netrc`` and ``socket``) because W&B has no public call that answers
"would ``wandb.init`` work?" without itself prompting or retrying.
"""
from __future__ import annotations

import netrc
import os
import socket
from collections.abc import Mapping
from urllib.parse import urlparse

from sg_train.errors import OptionError

__all__ = ["DEFAULT_HOST", "WANDB_MODES", "resolve_wandb_mode"]

DEFAULT_HOST = "https://api.wandb.ai"
WANDB_MODES = ("online", "offline", "disabled")
_ALIASES = {"dryrun": "offline", "run": "online"}


def _api_key(host: str, env: Mapping[str, str]) -> bool:
    if env.get("WANDB_API_KEY"):
        return True
    try:
        entry = netrc.netrc(env.get("NETRC") or None).authenticators(urlparse(host).hostname or host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def _reachable(host: str, timeout: float) -> str | None:
    """None when ``host`` accepts a TCP connection within ``timeout`` seconds, else the reason."""
    url = urlparse(host)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or host, port), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def resolve_wandb_mode(offline: bool, env: Mapping[str, str] | None = None, timeout: float = 3.0) -> tuple[str, str | None]:
    """``(mode, note)``: the mode the run should use, and one line to print when it differs from
    what was asked (else None).

    ``offline``: the logger's ``offline`` option. Raises :class:`~sg_train.errors.OptionError` for a
    ``WANDB_MODE`` W&B does not know.
    """
    env = os.environ if env is None else env
    asked = env.get("WANDB_MODE", "").strip().lower()
    if asked:
        mode = _ALIASES.get(asked, asked)
        if mode not in WANDB_MODES:
            raise OptionError(f"WANDB_MODE={env['WANDB_MODE']!r}; W&B knows {', '.join(WANDB_MODES)}")
        if mode != "online":
            return mode, None
    elif offline:
        return "offline", None
    host = env.get("WANDB_BASE_URL") or DEFAULT_HOST
    later = "the run is logged offline; upload it later with `wandb sync <run folder>/wandb/offline-run-*`"
    if not _api_key(host, env):
        return "offline", f"W&B: no API key for {host} (`wandb login`, or WANDB_API_KEY): {later}"
    problem = _reachable(host, timeout)
    if problem is not None:
        return "offline", f"W&B: {host} is unreachable ({problem}): {later}"
    return "online", None
