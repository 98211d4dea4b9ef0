"""W&B never blocks or kills a run: WANDB_MODE decides, and an online run without API key or
network goes offline within seconds, saying so in one line."""
from __future__ import annotations

import base64
import http.server
import json
import socket
import subprocess
import threading
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


class FakeAPI(http.server.BaseHTTPRequestHandler):
    """POST /graphql: W&B's answer for the key KEY, 401 for another; any other path: 404 (a proxy's page)."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        if self.path != "/graphql":
            self.send_error(404)
            return
        if self.headers["Authorization"] != "Basic " + base64.b64encode(f"api:{KEY}".encode()).decode():
            self.send_error(401)
            return
        body = json.dumps({"data": {"viewer": {"id": "u1"}}}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_api():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_key_from_netrc_and_a_host_that_answers_stay_online(tmp_path, fake_api):
    (tmp_path / "netrc").write_text(f"machine 127.0.0.1\n  login user\n  password {KEY}\n")
    assert resolve_wandb_mode(False, {"NETRC": str(tmp_path / "netrc"), "WANDB_BASE_URL": fake_api}) == ("online", None)


@pytest.mark.parametrize("path, key, reason", [
    ("/proxy", KEY, "HTTP 404"), ("", "x" * 40, "HTTP 401 (API key refused)")])
def test_a_host_that_is_not_wandb_or_refuses_the_key_goes_offline(fake_api, no_netrc, path, key, reason):
    env = {**no_netrc, "WANDB_API_KEY": key, "WANDB_BASE_URL": fake_api + path}
    mode, note = resolve_wandb_mode(False, env)
    assert mode == "offline" and f"is unreachable ({reason})" in note


def test_a_silent_host_goes_offline_after_the_timeout(no_netrc):
    with socket.socket() as server:  # accepts connections (the backlog), never answers
        server.bind(("127.0.0.1", 0))
        server.listen()
        env = {**no_netrc, "WANDB_API_KEY": KEY, "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}"}
        mode, note = resolve_wandb_mode(False, env, timeout=0.5)
    assert mode == "offline" and "unreachable" in note


def test_a_netrc_that_is_not_text_means_no_key(tmp_path):
    (tmp_path / "netrc").write_bytes(b"\xff\xfe\x00garbage")
    mode, note = resolve_wandb_mode(False, {"NETRC": str(tmp_path / "netrc"), "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert mode == "offline" and "no API key" in note


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
