"""One error family: every user-input error is a UserInputError (and still what it was before);
train.py prints one line for those and keeps the traceback for anything else."""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import train
from callbacks.finite_loss import NonFiniteLossError
from callbacks.retrieval_eval import RetrievalEvaluationError
from callbacks.skipped_images import SkippedImagesReport, TooManySkippedImagesError
from datamodules.gldv2_index import GLDv2CSVError, SplitFileError
from sg_train.backbone import create_backbone
from sg_train.errors import OptionError, UserInputError, is_user_error, one_line, reported_error, user_error_line
from sg_train.losses import build_loss
from sg_train.model import EmbeddingModel, ModelConfigError
from sg_train.optim import resolve_warmup_steps
from sg_train.pooling.head import parse_head_spec
from sg_train.r1m_extraction import R1MExtractionError
from sg_train.relu_plus import ReLUPlusBackboneError
from sg_train.retrieval import GroundTruthError, RetrievalInputError, UnsafePickleError
from sg_train.run_folder import RunFolderError
from sg_train.weights_io import WeightsFileError, WeightsMismatchError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("error", "also"),
    [
        (RetrievalInputError, ValueError),
        (GroundTruthError, ValueError),
        (UnsafePickleError, pickle.UnpicklingError),
        (WeightsMismatchError, ValueError),
        (WeightsFileError, WeightsMismatchError),
        (ModelConfigError, WeightsFileError),
        (RunFolderError, ValueError),
        (R1MExtractionError, ValueError),
        (GLDv2CSVError, ValueError),
        (SplitFileError, ValueError),
        (OptionError, ValueError),
        (ReLUPlusBackboneError, TypeError),
        (NonFiniteLossError, FloatingPointError),
        (TooManySkippedImagesError, RuntimeError),
    ],
)
def test_each_user_input_error_is_a_user_input_error_and_keeps_its_old_base(error, also):
    assert issubclass(error, UserInputError) and issubclass(error, ValueError)
    assert issubclass(error, also)  # every `except` written for it before still catches it


@pytest.mark.parametrize(
    "bad_option",
    [
        lambda: create_backbone("resnet18x"),
        lambda: parse_head_spec("gem_plus"),
        lambda: build_loss("arcfaec", embedding_dim=8, num_classes=3),
        lambda: build_loss("arcface", embedding_dim=8, num_classes=3, s="30"),
        lambda: resolve_warmup_steps(-1.0, total_steps=10),
        lambda: EmbeddingModel("resnet18", "gem", 8, scales=()),
        lambda: SkippedImagesReport(max_fraction=2.0),
    ],
)
def test_a_bad_configuration_value_is_an_option_error(bad_option):
    with pytest.raises(OptionError):
        bad_option()


def test_is_user_error_follows_explicit_causes_only():
    assert is_user_error(GroundTruthError("bad gnd")) and is_user_error(FileNotFoundError("gone"))
    assert not is_user_error(KeyError("bug")) and not is_user_error(ValueError("plain"))
    try:
        try:
            raise GroundTruthError("bad gnd")
        except GroundTruthError as exc:
            raise RuntimeError("evaluation failed") from exc  # a wrapper naming where: still bad input
    except RuntimeError as wrapped:
        assert is_user_error(wrapped)
    try:
        try:
            raise GroundTruthError("bad gnd")
        except GroundTruthError:
            raise RuntimeError("a bug in the handler")  # only its __context__: a bug
    except RuntimeError as bug:
        assert not is_user_error(bug)
    assert one_line(GroundTruthError("two\n  lines")) == "two lines" and one_line(KeyError()) == "KeyError"


def test_the_line_keeps_a_paths_spaces_and_reads_through_a_librarys_wrapper():
    path = "/photos/  Tour Eiffel  at night /IMG 1.jpg"
    assert one_line(UserInputError(f"cannot read image '{path}':\n    truncated")) == (
        f"cannot read image '{path}': truncated")
    option = OptionError("give data.images or data.csv, not both")
    try:
        try:
            raise option
        except OptionError as exc:  # as jsonargparse wraps a constructor's error in subclass mode
            raise ValueError("Does not validate against any of the Union subtypes ... Given value: "
                             "Namespace(class_path=..., init_args=Namespace(...))") from exc
    except ValueError as wrapped:
        assert reported_error(wrapped) is option
        assert user_error_line(wrapped) == "give data.images or data.csv, not both"
    house_wrapper = RetrievalEvaluationError("retrieval evaluation failed at epoch 0 ...; continue with --ckpt_path x")
    house_wrapper.__cause__ = GroundTruthError("bad gnd")
    assert reported_error(house_wrapper) is house_wrapper  # the house's wrapper says how to go on


def test_run_command_line_reports_bad_input_in_one_line_and_re_raises_the_rest(monkeypatch, capsys):
    def bad_input():
        raise SplitFileError("split file s.json was written for another CSV;\n delete it")

    monkeypatch.setattr(train, "main", bad_input)
    assert train.run_command_line() == 1
    assert capsys.readouterr().err == "train.py: error: split file s.json was written for another CSV; delete it\n"

    def bug():
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train, "main", bug)
    with pytest.raises(ZeroDivisionError):
        train.run_command_line()


def _train_py(tmp_path: Path, *python: str) -> subprocess.CompletedProcess:
    """``train.py fit`` on a config whose data root does not exist, in a fresh interpreter; ``python``
    lines run first (e.g. to plant a bug)."""
    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["trainer"].update(default_root_dir=str(tmp_path / "run"), logger=False, callbacks=[])
    config["model"].update(backbone="resnet18", embedding_dim=16)
    config["data"]["init_args"].update(data_root=str(tmp_path / "no-such-folder"), num_workers=0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    argv = ["train.py", "fit", "--config", str(tmp_path / "config.yaml")]
    script = "\n".join(["import runpy, sys", *python, f"sys.argv = {argv!r}", "runpy.run_path('train.py', run_name='__main__')"])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_train_py_missing_data_is_one_line_and_exit_1(tmp_path):
    result = _train_py(tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"train.py: error: GLDv2 CSV not found: {tmp_path / 'no-such-folder' / 'train.csv'}"


def test_train_py_bug_keeps_its_traceback(tmp_path):
    plant = ["import sg_train.run_folder as rf",
             "def plan_run(*args, **kwargs): raise RuntimeError('planted bug')",
             "rf.plan_run = plan_run"]
    result = _train_py(tmp_path, *plant)
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "RuntimeError: planted bug"
    assert "train.py: error" not in result.stderr
