"""W&B never blocks or kills a run: WANDB_MODE decides, and an online run without API key or
network goes offline within seconds, saying so in one line."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

import wandb_records
from child_env import child_env
from sg_train.errors import OptionError
from sg_train.wandb_mode import resolve_wandb_mode
from test_runs import ROOT, demo_config

KEY = "k" * 40


def closed_port() -> int:
    """A local port that refuses connections (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_netrc(tmp_path):
    (tmp_path / "netrc").write_text("")
    return {"NETRC": str(tmp_path / "netrc")}


@pytest.mark.parametrize("asked, offline, expected", [
    ("disabled", True, "disabled"),   # the demo's offline: true no longer overrides WANDB_MODE=disabled
    ("offline", False, "offline"), ("dryrun", False, "offline"), ("", True, "offline"),
])
def test_wandb_mode_in_the_environment_decides(asked, offline, expected, no_netrc):
    assert resolve_wandb_mode(offline, {"WANDB_MODE": asked, **no_netrc}) == (expected, None)


def test_no_api_key_goes_offline_with_one_line(no_netrc):
    mode, note = resolve_wandb_mode(False, {**no_netrc, "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert mode == "offline" and note.startswith("W&B: no API key for http://127.0.0.1:9 (`wandb login`")
    assert "wandb sync" in note


def test_a_key_but_a_refusing_host_goes_offline(no_netrc):
    env = {**no_netrc, "WANDB_API_KEY": KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{closed_port()}"}
    mode, note = resolve_wandb_mode(False, env, timeout=2.0)
    assert mode == "offline" and "is unreachable (Connection refused)" in note


def test_a_key_from_netrc_and_a_listening_host_stay_online(tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        host = f"http://127.0.0.1:{server.getsockname()[1]}"
        (tmp_path / "netrc").write_text(f"machine 127.0.0.1\n  login user\n  password {KEY}\n")
        assert resolve_wandb_mode(False, {"NETRC": str(tmp_path / "netrc"), "WANDB_BASE_URL": host}) == ("online", None)


def test_an_unknown_mode_is_named():
    with pytest.raises(OptionError, match="WANDB_MODE='ofline'; W&B knows online, offline, disabled"):
        resolve_wandb_mode(False, {"WANDB_MODE": "ofline"})


def test_train_without_network_logs_offline_and_says_so(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    (tmp_path / "netrc").write_text("")
    env = {k: v for k, v in child_env().items() if k != "WANDB_MODE"}
    env.update(WANDB_API_KEY=KEY, WANDB_BASE_URL=f"http://127.0.0.1:{closed_port()}", NETRC=str(tmp_path / "netrc"))
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "fit", "--config", str(config)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("train.py: W&B:")]
    assert len(lines) == 1 and "is unreachable (Connection refused)" in lines[0]
    assert wandb_records.run_file(tmp_path / "run" / "wandb").name.endswith(".wandb")
    assert list(Path(tmp_path / "run" / "wandb").glob("offline-run-*"))
