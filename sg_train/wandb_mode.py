"""Decide a W&B run's mode before it starts: never block or kill training over W&B.

``WANDB_MODE`` in the environment decides when set (``online``, ``offline``, ``disabled``;
``dryrun`` is W&B's old name for offline, ``run`` for online). Otherwise the logger's ``offline``
option decides, and an online run first checks, within seconds, that it can work:

* an API key: ``WANDB_API_KEY``, or the ``~/.netrc`` entry (``$NETRC``) for the W&B host that
  ``wandb login`` writes;
* the host (``WANDB_BASE_URL``, default ``https://api.wandb.ai``) answers W&B's GraphQL API
  (``POST /graphql``, the ``viewer`` query ``wandb login --verify`` asks, HTTP basic auth
  ``api:<key>``) with a JSON ``data`` object within ``timeout`` seconds: a refused connection, a
  silent host, a proxy's or portal's error page, and a refused key all fail it.

Without either, the run goes offline with one line that says why and how to upload it later
(``wandb sync``), instead of W&B's prompt, traceback, or ~110 s of retries. These checks are
hand-written (stdlib ``netrc`` and ``urllib``) because W&B has no public call that answers
"would ``wandb.init`` work?" without itself prompting or retrying.

Two more W&B facts train.py acts on before a run starts (wandb 0.31):

* :func:`sweep_run`: under ``wandb agent`` W&B uses the agent's ``WANDB_RUN_ID`` and ignores the
  id given to ``wandb.init``.
* :data:`FLUSH_INTERVAL_ENV`: how much of a killed run's log is lost.
"""
from __future__ import annotations

import base64
import json
import netrc
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from urllib.parse import urlparse

from sg_train.errors import OptionError

__all__ = ["DEFAULT_HOST", "FLUSH_INTERVAL_ENV", "FLUSH_INTERVAL_S", "WANDB_MODES", "resolve_wandb_mode", "sweep_run"]

DEFAULT_HOST = "https://api.wandb.ai"
WANDB_MODES = ("online", "offline", "disabled")
_ALIASES = {"dryrun": "offline", "run": "online"}
#: W&B's environment variable for its private setting ``x_transaction_log_flush_interval`` (``WANDB__<name>``
#: sets ``x_<name>``). wandb-core holds a run's newest records in memory and writes them to the run file
#: (``wandb/offline-run-*/run-<id>.wandb``, online runs too) when a 32 KiB block fills, every interval
#: (15 s by default) and when the run finishes. When the training process is killed (SIGKILL, the OOM
#: killer, a job's hard time limit) wandb-core exits within 0.1 s without writing them: the rows logged
#: since the last write (at most one interval, at most 32 KiB) are lost, for ``wandb sync`` too.
#: train.py sets :data:`FLUSH_INTERVAL_S` unless the environment sets this variable; a W&B without the
#: setting ignores it.
FLUSH_INTERVAL_ENV = "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL"
FLUSH_INTERVAL_S = 1.0  # one small write() a second while rows come in


def _api_key(host: str, env: Mapping[str, str]) -> str | None:
    if env.get("WANDB_API_KEY"):
        return env["WANDB_API_KEY"]
    try:
        entry = netrc.netrc(env.get("NETRC") or None).authenticators(urlparse(host).hostname or host)
    except (OSError, ValueError, netrc.NetrcParseError):  # missing, unreadable, not text, malformed: no key
        return None
    return entry[2] if entry and entry[2] else None


def _answers(host: str, key: str, timeout: float) -> str | None:
    """None when ``host`` answers W&B's GraphQL API within ``timeout`` seconds, else the reason."""
    request = urllib.request.Request(
        host.rstrip("/") + "/graphql", data=json.dumps({"query": "{ viewer { id } }"}).encode(), method="POST",
        headers={"Content-Type": "application/json",
                 "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode()})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read(1 << 16) or b"null")
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}{' (API key refused)' if exc.code in (401, 403) else ''}"
    except urllib.error.URLError as exc:
        return getattr(exc.reason, "strerror", None) or str(exc.reason)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except (OSError, ValueError) as exc:
        return f"not W&B's API ({type(exc).__name__})"
    if not isinstance(body, dict) or not isinstance(body.get("data"), dict):
        return "not W&B's API (no GraphQL data in its answer)"
    return None


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
    key = _api_key(host, env)
    if key is None:
        return "offline", f"W&B: no API key for {host} (`wandb login`, or WANDB_API_KEY): {later}"
    problem = _answers(host, key, timeout)
    if problem is not None:
        return "offline", f"W&B: {host} is unreachable ({problem}): {later}"
    return "online", None


def sweep_run() -> tuple[str, str] | None:
    """``(sweep id, run id)`` when ``wandb agent`` started this process, else None.

    The agent sets ``WANDB_SWEEP_ID`` and, for each run it starts, ``WANDB_RUN_ID``; with a sweep id
    ``wandb.init`` ignores the id it is given and uses ``WANDB_RUN_ID`` (or, without one, an id of its
    own that nothing else could know). Raises :class:`~sg_train.errors.OptionError` for a
    ``WANDB_SWEEP_ID`` without ``WANDB_RUN_ID``.
    """
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not sweep_id:
        return None
    if not run_id:
        raise OptionError(f"WANDB_SWEEP_ID={sweep_id!r} without WANDB_RUN_ID: start sweep runs with "
                          f"`wandb agent {sweep_id}` (it sets both), or unset WANDB_SWEEP_ID")
    return sweep_id, run_id
