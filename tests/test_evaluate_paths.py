"""evaluate.py: every path it writes (--json, --cache-dir, --r1m-out, --examples-dir) is checked before
any work, with one error line naming the option, the path and the fix."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import evaluate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_work(monkeypatch):
    """Loading a model, extracting or searching fails the test: the paths come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the output paths were checked")

    for name in ("load_model", "extract_all", "evaluate_sweep"):
        monkeypatch.setattr(evaluate, name, refuse)


def _error(capsys, argv) -> str:
    assert evaluate.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("evaluate.py: error: "), err
    return err


def test_a_json_that_is_a_folder_or_inside_a_file_is_refused_before_the_search(files, tmp_path, capsys, no_work):
    """--json runs (a folder) raised IsADirectoryError after the whole evaluation."""
    descriptors = ["--descriptors", files["Q"], files["X"], "--gnd", files["gnd"]]
    err = _error(capsys, [*descriptors, "--json", tmp_path])
    assert f"--json {tmp_path} is a folder" in err and "results.json" in err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    err = _error(capsys, [*descriptors, "--json", a_file / "out.json"])
    assert f"--json {a_file / 'out.json'}: its folder {a_file} is a file, not a folder" in err
    assert a_file.read_text() == "keep me"


def test_a_json_in_a_missing_folder_is_written_there(files, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "out.json"
    assert evaluate.main([str(a) for a in ["--descriptors", files["Q"], files["X"], "--gnd", files["gnd"],
                                           "--json", out]]) == 0
    assert set(json.loads(out.read_text())) == {"toyford"}


@pytest.mark.parametrize("option", ["--cache-dir", "--r1m-out", "--examples-dir"])
@pytest.mark.parametrize("under", [False, True], ids=["a-file", "inside-a-file"])
def test_an_output_folder_that_is_a_file_or_inside_one_is_refused_before_the_model(tmp_path, capsys, no_work, option,
                                                                                   under):
    """--cache-dir README.md raised FileExistsError, README.md/sub NotADirectoryError, both with a traceback."""
    a_file = tmp_path / "README.md"
    a_file.write_text("keep me")
    path = a_file / "sub" if under else a_file
    argv = ["--checkpoint", tmp_path / "m.ckpt", "--data-root", tmp_path, "--datasets", "rsynth", option, path]
    if option == "--r1m-out":
        argv += ["--r1m", tmp_path]
    err = _error(capsys, argv)
    why = f"is inside {a_file}, which is a file, not a folder" if under else "is a file, not a folder"
    assert f"{option} {path} {why}; give {option} a folder" in err
    assert a_file.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [a_file]
