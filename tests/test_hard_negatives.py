"""sg_train.hard_negatives: the mined hard-negative folder (chunked, resumable, DDP-split) and its strict reader."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from child_env import child_env

from sg_train.errors import UserInputError, is_user_error
from sg_train.hard_negatives import HEADER, HardNegativesError, HardNegativeWriter, load_hard_negatives

N, C, TOP_N, CHUNK = 23, 7, 3, 5  # 23 images in 5 chunks (the last of 3 images)
MODEL, DATA = "m" * 64, "d" * 64
COMMAND = "python mine.py --out hn"


def mined(rows: range) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a stage-1 model 'predicts' for images ``rows``: label i % C; wrong classes the next ones."""
    index = np.arange(rows.start, rows.stop)
    labels = index % C
    wrong = (labels[:, None] + 1 + np.arange(TOP_N) + index[:, None] % 2) % C
    scores = (0.9 - 0.1 * np.arange(TOP_N) - 0.001 * index[:, None]).astype(np.float32)
    predicted = np.where(index % 4 == 0, wrong[:, 0], labels)
    return wrong, scores, predicted


def writer(path: Path, **kwargs) -> HardNegativeWriter:
    options = {"model_fingerprint": MODEL, "data_fingerprint": DATA, "num_images": N, "num_classes": C, "top_n": TOP_N,
                   "chunk_size": CHUNK, "command": COMMAND}
    return HardNegativeWriter(path, **{**options, **kwargs})


def mine(w: HardNegativeWriter, chunks=None) -> list[int]:
    done = []
    for chunk in w.missing_chunks() if chunks is None else chunks:
        w.write_chunk(chunk, *mined(w.chunk_range(chunk)))
        done.append(chunk)
    return done


def load(path: Path, **kwargs):
    return load_hard_negatives(path, **{"model_fingerprint": MODEL, "data_fingerprint": DATA, **kwargs})


@pytest.fixture
def complete(tmp_path) -> Path:
    path = tmp_path / "hn"
    mine(writer(path))
    return path


def test_round_trip_gives_every_image_in_index_order_with_its_dtypes(complete):
    hn = load(complete)
    wrong, scores, predicted = mined(range(N))
    np.testing.assert_array_equal(hn.wrong_classes, wrong)
    np.testing.assert_array_equal(hn.scores, scores)
    np.testing.assert_array_equal(hn.predicted, predicted)
    assert (hn.wrong_classes.dtype, hn.scores.dtype, hn.predicted.dtype) == (np.int64, np.float32, np.int64)
    assert hn.wrong_classes.shape == (N, TOP_N) and hn.num_images == N and hn.top_n == TOP_N
    np.testing.assert_array_equal(hn.misclassified(np.arange(N) % C), np.arange(N) % 4 == 0)
    header = json.loads((complete / HEADER).read_text())
    assert header["format"] == "sg-train-hard-negatives" and header["version"] == 1
    assert (header["model_fingerprint"], header["data_fingerprint"], header["num_images"], header["top_n"],
            header["chunk_size"], header["chunks"]) == (MODEL, DATA, N, TOP_N, CHUNK, 5)
    assert "cosine" in header["score"] and header["command"] == COMMAND
    assert sorted(p.name for p in (complete / "chunks").iterdir()) == [
        f"{c:06d}.{ext}" for c in range(5) for ext in ("json", "npz")]  # no temporary file left


def test_rows_with_fewer_wrong_classes_than_top_n_end_in_minus_one_and_nan(tmp_path):
    w = writer(tmp_path / "hn", num_images=2, num_classes=3, chunk_size=2)
    w.write_chunk(0, [[1, 2, -1], [0, -1, -1]], [[0.5, 0.2, 0.0], [0.3, 0.0, 0.0]], [0, 1])
    hn = load(tmp_path / "hn")
    np.testing.assert_array_equal(hn.wrong_classes, [[1, 2, -1], [0, -1, -1]])
    assert np.isnan(hn.scores[0, 2]) and np.isnan(hn.scores[1, 1:]).all() and hn.scores[0, 1] == np.float32(0.2)


@pytest.mark.parametrize("bad, match", [
    ({"wrong_classes": [[1, 1, 2]]}, "names a class twice"),
    ({"wrong_classes": [[1, -1, 2]]}, "only be followed by -1"),
    ({"wrong_classes": [[1, 2, 7]]}, r"\[0, 7\)"),
    ({"predicted": [9]}, "predicted must lie"),
    ({"scores": [[0.5, np.nan, 0.1]]}, "finite"),
    ({"scores": [[0.5, 0.1]]}, "shape"),
])
def test_a_chunk_with_impossible_rows_is_not_written(tmp_path, bad, match):
    w = writer(tmp_path / "hn", num_images=1, chunk_size=1)
    rows = {"wrong_classes": [[1, 2, 3]], "scores": [[0.5, 0.4, 0.1]], "predicted": [0], **bad}
    with pytest.raises(ValueError, match=match):
        w.write_chunk(0, **rows)
    assert w.missing_chunks() == [0]


def test_a_resumed_mining_writes_only_the_missing_chunks_and_gives_identical_arrays(complete, tmp_path):
    path = tmp_path / "resumed"
    first = writer(path)
    assert first.missing_chunks() == [0, 1, 2, 3, 4]
    mine(first, [0, 3])
    # a kill between the .npz and its record, and one inside atomic_write (its temporary file)
    np.savez(path / "chunks" / "000001.npz", junk=np.zeros(3))
    (path / "chunks" / ".000002.npz.x.tmp").write_bytes(b"half")
    with pytest.raises(HardNegativesError, match=r"incomplete: 3 of 5 chunks are missing .*rerun `python mine.py"):
        load(path)
    again = writer(path)  # the same command, run again
    assert again.missing_chunks() == [1, 2, 4] and not again.complete
    assert mine(again) == [1, 2, 4]
    assert again.complete and again.missing_chunks() == []
    ours, reference = load(path), load(complete)
    for name in ("wrong_classes", "scores", "predicted"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(reference, name))


def test_a_mining_killed_with_sigkill_resumes_with_the_missing_chunks(complete, tmp_path):
    path = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = {[str(Path(__file__).parent)]!r}
        from test_hard_negatives import mine, writer
        w = writer({str(path)!r})
        mine(w, [0, 1])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", script], env=child_env(), capture_output=True, text=True, timeout=120,
                         check=False)
    assert run.returncode == -signal.SIGKILL, run.stderr
    w = writer(path)
    assert mine(w) == [2, 3, 4]
    np.testing.assert_array_equal(load(path).wrong_classes, load(complete).wrong_classes)


def test_two_ranks_writing_disjoint_chunks_give_the_single_process_result(complete, tmp_path):
    path = tmp_path / "ddp"
    rank0 = writer(path)  # rank 0 first, then (after a barrier) the others
    rank1 = writer(path)
    assert rank0.chunks_for(0, 2) == [0, 2, 4] and rank1.chunks_for(1, 2) == [1, 3]
    assert set(rank0.chunks_for(0, 2)).isdisjoint(rank1.chunks_for(1, 2))
    mine(rank1, rank1.missing_chunks(1, 2))
    assert rank0.missing_chunks(0, 2) == [0, 2, 4] and rank1.missing_chunks(1, 2) == []
    mine(rank0, rank0.missing_chunks(0, 2))
    both, single = load(path), load(complete)
    for name in ("wrong_classes", "scores", "predicted"):
        np.testing.assert_array_equal(getattr(both, name), getattr(single, name))
    assert sorted(np.concatenate([list(rank0.chunk_range(c)) for c in range(5)])) == list(range(N))


# ---------------------------------------------------------------------------- refusals
def test_a_missing_folder_or_header_is_refused_naming_the_path_and_how_to_mine(tmp_path):
    with pytest.raises(HardNegativesError, match=r"folder .*nowhere not found: mine them first \(`mine.sh`\)"):
        load(tmp_path / "nowhere", mine_command="mine.sh")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HardNegativesError, match=r"empty holds no hard negatives \(hard_negatives.json is missing\)"):
        load(tmp_path / "empty")


@pytest.mark.parametrize("key, cause", [("model_fingerprint", "another model"),
                                        ("data_fingerprint", "another data set")])
def test_hard_negatives_of_another_model_or_data_set_are_refused(complete, key, cause):
    with pytest.raises(HardNegativesError) as info:
        load(complete, **{key: "x" * 64}, mine_command="mine.sh")
    message = str(info.value)
    assert str(complete) in message and f"was mined with {cause}" in message
    assert f"{key} {('m' if key == 'model_fingerprint' else 'd') * 12}" in message and "xxxxxxxxxxxx" in message
    assert "`mine.sh`" in message and "\n" not in message


def test_a_truncated_or_altered_chunk_is_refused_and_mined_again_on_resume(complete):
    npz = complete / "chunks" / "000002.npz"
    good = npz.read_bytes()
    npz.write_bytes(good[: len(good) // 2])
    with pytest.raises(HardNegativesError, match=r"chunk 2 \(images 10..14\) is damaged: 000002.npz is truncated"
                                                 r".*rerun `python mine.py --out hn`"):
        load(complete)
    w = writer(complete)
    with pytest.warns(UserWarning, match="chunk 2 is damaged"):
        assert w.missing_chunks() == [2]
    mine(w, [2])
    assert npz.read_bytes() == good and load(complete).num_images == N
    data = dict(np.load(npz))  # altered values, same shapes: the digests catch it
    data["scores"][0, 0] += 1
    np.savez(npz, **data)
    with pytest.raises(HardNegativesError, match="does not match the digests"):
        load(complete)
    npz.unlink()
    with pytest.raises(HardNegativesError, match="000002.npz is missing although 000002.json says"):
        load(complete)


def test_an_unknown_format_version_or_another_format_is_refused(complete):
    header = json.loads((complete / HEADER).read_text())
    (complete / HEADER).write_text(json.dumps({**header, "version": 2}))
    with pytest.raises(HardNegativesError, match=r"format version 2; this sg-train reads version 1"):
        load(complete)
    with pytest.raises(HardNegativesError, match=r"format version 2.*overwrite=True"):
        writer(complete)
    (complete / HEADER).write_text(json.dumps({**header, "format": "something-else"}))
    with pytest.raises(HardNegativesError, match="not a hard-negative header"):
        load(complete)


def test_the_refusals_are_user_errors_printed_in_one_line(tmp_path):
    with pytest.raises(UserInputError) as info:
        load(tmp_path / "nowhere")
    assert is_user_error(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("change, match", [
    ({"model_fingerprint": "x" * 64}, "mined with another model"),
    ({"data_fingerprint": "x" * 64}, "mined with another data set"),
    ({"top_n": 2}, r"top_n=3, now 2"),
    ({"chunk_size": 4}, r"chunk_size=5, now 4 \(pass chunk_size=5 to continue it\)"),
])
def test_a_writer_refuses_a_folder_of_another_mining_unless_told_to_overwrite(complete, change, match):
    before = sorted(p.name for p in (complete / "chunks").iterdir())
    with pytest.raises(HardNegativesError, match=match + ".*overwrite=True"):
        writer(complete, **change)
    assert sorted(p.name for p in (complete / "chunks").iterdir()) == before  # nothing lost
    (complete / "notes.txt").write_text("mine")
    w = writer(complete, **change, overwrite=True)
    assert w.missing_chunks() == list(range(w.num_chunks)) and (complete / "notes.txt").read_text() == "mine"


def test_a_writer_refuses_chunks_without_a_header(tmp_path):
    (tmp_path / "hn" / "chunks").mkdir(parents=True)
    with pytest.raises(HardNegativesError, match="has chunks/ but no hard_negatives.json"):
        writer(tmp_path / "hn")
