"""W&B sweeps of train.py (configs/sweeps/train.yaml): every swept name is a train.py option, and a run
that `wandb agent` starts is the agent's W&B run, in a run folder of its own.

The agent is simulated as wandb 0.31 runs a trial (wandb/wandb_agent.py, Agent._command_run): it sets
WANDB_SWEEP_ID, WANDB_RUN_ID and WANDB_SWEEP_PARAM_PATH (a YAML of the trial's values that
``wandb.init`` loads into the run's config) and runs the sweep's ``command``, with ``${args}`` as
``--<name>=<value>`` (``str`` of the value) for each parameter.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train
import wandb_records
from child_env import child_env
from sg_train.errors import OptionError
from test_runs import ROOT, demo_config

SWEEP = ROOT / "configs" / "sweeps" / "train.yaml"


def sweep() -> dict:
    return yaml.safe_load(SWEEP.read_text())


def trial(spec: dict, end: str = "first") -> dict:
    """A value the sweep may give each parameter: its first (last) listed value, or the low (high) end of its range."""
    first = end == "first"
    return {name: p["values"][0 if first else -1] if "values" in p else p["min" if first else "max"]
            for name, p in spec["parameters"].items()}


def agent_args(values: dict) -> list[str]:
    return [f"--{name}={value}" for name, value in values.items()]  # as wandb_agent builds ${args}


def fixed_args(spec: dict) -> list[str]:
    """The sweep command's own arguments, between ``${program}`` and ``${args}``."""
    command = spec["command"]
    return command[command.index("${program}") + 1 : command.index("${args}")]


def lookup(config: dict, name: str):
    """The value an option name sets in a resolved config (``data.batch_size`` is ``data.init_args.batch_size``)."""
    node = config
    for key in name.split("."):
        if key not in node and "init_args" in node:
            node = node["init_args"]
        node = node[key]
    return node


def test_the_sweep_file_is_a_sweep_of_train_py():
    spec = sweep()
    assert spec["program"] == "train.py" and (ROOT / spec["program"]).is_file()
    assert spec["method"] in ("grid", "random", "bayes")
    assert spec["metric"]["goal"] in ("maximize", "minimize")
    assert spec["command"][:3] == ["${env}", "${interpreter}", "${program}"] and spec["command"][-1] == "${args}"
    for name, p in spec["parameters"].items():
        assert ("values" in p) != ("distribution" in p), name
        assert "values" in p or p["min"] < p["max"], name


@pytest.mark.parametrize("end", ["first", "last"])
def test_every_swept_name_is_a_train_py_option_and_sets_what_it_names(end, monkeypatch, capsys):
    """The YAML cannot rot: each --name=value the agent passes parses, and lands where the name says."""
    spec = sweep()
    values = trial(spec, end)
    monkeypatch.chdir(ROOT)  # the agent runs the command from the repository root
    with pytest.raises(SystemExit) as done:
        train.main([*fixed_args(spec), *agent_args(values), "--print_config"])
    assert done.value.code == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    for name, value in values.items():
        assert lookup(resolved, name) == value, name


def run_as_agent(tmp_path: Path, config: Path, sweep_id: str, run_id: str) -> Path:
    """One trial of the sweep, as `wandb agent` starts it in ``tmp_path`` (the tiny config in place of
    configs/demo.yaml); returns the W&B run folder the run reported."""
    spec = sweep()
    params = tmp_path / "wandb" / f"sweep-{sweep_id}" / f"config-{run_id}.yaml"  # where the agent writes it
    params.parent.mkdir(parents=True, exist_ok=True)
    params.write_text("wandb_version: 1\n\n" + yaml.safe_dump({k: {"value": v} for k, v in trial(spec).items()}))
    fixed = [str(config) if arg == "configs/demo.yaml" else arg for arg in fixed_args(spec)]
    env = {**child_env(), "WANDB_SWEEP_ID": sweep_id, "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(params),
           "WANDB_PROJECT": spec["project"]}
    done = subprocess.run([sys.executable, str(ROOT / spec["program"]), *fixed, *agent_args(trial(spec))], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp_path / "runs" / "sweeps" / f"sweep-{sweep_id}" / run_id


def test_agent_runs_are_the_agents_wandb_runs_each_in_its_own_folder(tmp_path, synthetic_data, wandb_env):
    """Two trials of one sweep: each logs to the W&B run the agent made for it, with the swept values
    and the sweep's metric, in its own run folder; a resume outside the agent keeps the run's id."""
    spec = sweep()
    config = demo_config(tmp_path, synthetic_data, retrieval={"evaluate_before_training": False, "rerank": False},
                         max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    first, second = (run_as_agent(tmp_path, config, "swp0001", run_id) for run_id in ("trial001", "trial002"))
    assert first != second
    for run_dir in (first, second):
        assert json.loads((run_dir / "run.json").read_text())["wandb_id"] == run_dir.name
        path = wandb_records.run_file(run_dir / "wandb")
        assert wandb_records.run_record(path) == {"run_id": run_dir.name, "sweep_id": "swp0001"}
        logged = wandb_records.config(path)
        for name, value in trial(spec).items():
            assert lookup(logged, name) == value, name  # the configuration the run trained with
        assert spec["metric"]["name"] in {key for row in wandb_records.history(path) for key in row}

    last = first / "checkpoints" / "last.ckpt"
    train.main(["fit", "--config", str(first / "config.yaml"), f"--ckpt_path={last}", "--trainer.max_epochs=2"])
    runs = wandb_records.run_files(first / "wandb")
    assert [wandb_records.run_record(p)["run_id"] for p in runs] == ["trial001", "trial001"]

    # the agent restarts a trial (preempted): the sweep command's --ckpt_path=last continues its folder
    assert run_as_agent(tmp_path, config, "swp0001", "trial001") == first
    # continued by hand with the agent's variables still set: the trial's config.yaml names its folder
    wandb_env(WANDB_SWEEP_ID="swp0001", WANDB_RUN_ID="trial001")
    train.main(["fit", "--config", str(first / "config.yaml"), "--ckpt_path=last", "--trainer.max_epochs=3"])
    assert not (first / "sweep-swp0001").exists()
    assert [start["resumed_from"] is not None for start in json.loads((first / "run.json").read_text())["starts"]] == [
        False, True, True, True]


def test_a_sweep_id_without_a_run_id_is_named(tmp_path, synthetic_data, monkeypatch):
    monkeypatch.setenv("WANDB_SWEEP_ID", "swp0001")
    config = demo_config(tmp_path, synthetic_data)
    with pytest.raises(OptionError, match=r"WANDB_SWEEP_ID='swp0001' without WANDB_RUN_ID: .*wandb agent swp0001"):
        train.main(["fit", "--config", str(config)])
    assert not (tmp_path / "run").exists()
