"""R1M distractors: list reading, missing files, resumable memory-mapped extraction (also after SIGKILL)."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from child_env import child_env
from datamodules.r1m import MissingImagesWarning, R1MDataset
from r1m_kill_probe import BATCH_SIZE, build_model, dataset
from sg_train.r1m_extraction import R1MChunkWarning, R1MDescriptors, R1MExtractionError, extract_r1m
from sg_train.synthetic import generate

REPO = Path(__file__).resolve().parents[1]
N = 24
CHUNK = 8


@pytest.fixture(scope="module")
def r1m_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn_r1m")
    generate(out, train_landmarks=4, views_per_landmark=3, bench_landmarks=3, bench_positives=3,
             bench_distractors=6, r1m_distractors=N, image_size=64, progress=False)
    return out / "revisitop1m"


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "model.pt"
    torch.save(build_model().state_dict(), path)
    return str(path)


@pytest.fixture
def counted_model(weights):
    """The probe's model, counting the images it embeds (once per image, whatever the scales)."""
    model = build_model(weights)
    model.images_seen = 0
    aggregate = model.head.aggregate_scales

    def counting(descriptors):
        model.images_seen += descriptors[0].shape[0]
        return aggregate(descriptors)

    model.head.aggregate_scales = counting
    return model


def _run(model, root, out_dir, **kw):
    kw.setdefault("chunk_size", CHUNK)
    return extract_r1m(model, dataset(root, model), out_dir, batch_size=BATCH_SIZE, progress=False, **kw)


@pytest.fixture(scope="module")
def reference(r1m_root, weights, tmp_path_factory):
    """An uninterrupted extraction."""
    return _run(build_model(weights), r1m_root, tmp_path_factory.mktemp("ref") / "r1m")


# ------------------------------------------------------------------------------ dataset
def test_list_paths_and_sizes(r1m_root):
    ds = R1MDataset(r1m_root, mean=None, std=None, max_size=48)
    lines = (r1m_root / "revisitop1m.txt").read_text().splitlines()
    assert ds.names == lines and len(ds) == N and ds.missing == []
    assert ds.paths[0] == str(r1m_root / "jpg" / lines[0])  # <root>/jpg/<line>, extension in the line
    sizes = ds.image_sizes()
    for i in (0, 7, N - 1):
        assert tuple(ds[i][0].shape[1:]) == sizes[i] and max(sizes[i]) <= 48


def test_missing_and_unreadable_listed_files_are_reported_and_skipped(r1m_root, tmp_path):
    root = tmp_path / "revisitop1m"
    shutil.copytree(r1m_root, root)
    lines = (root / "revisitop1m.txt").read_text().splitlines()
    (root / "jpg" / "zz").mkdir()
    (root / "jpg" / "zz" / "corrupt.jpg").write_bytes(b"\x00garbage")
    extra = ["zz/missing.jpg", "", "/etc/hostname", "../revisitop1m.txt", "zz/corrupt.jpg"]
    new = lines[:3] + extra + lines[3:]
    (root / "revisitop1m.txt").write_text("\n".join(new) + "\n")
    with pytest.warns(MissingImagesWarning, match=rf"5 of {N + 5} listed images are missing or unreadable .*\({N} usable\)"):
        ds = R1MDataset(root, mean=None, std=None)
    assert [(r, n) for r, n, _ in ds.missing] == [(3 + k, n) for k, n in enumerate(extra)]
    reasons = [why for _, _, why in ds.missing]
    assert reasons[0] == "file not found" and reasons[1] == "blank line" and "absolute" in reasons[2]
    assert "leaves" in reasons[3] and "not a recognised image" in reasons[4]
    assert ds.valid_indices.tolist() == [0, 1, 2] + list(range(8, N + 5))
    assert ds.valid_mask.sum() == N and not ds.valid_mask[3:8].any()
    assert len(ds) == N and ds.paths[3].endswith(new[8])


def test_missing_list_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"revisitop1m\.txt"):
        R1MDataset(tmp_path, mean=None, std=None)


# ------------------------------------------------------------------------------ extraction
def test_extraction_layout_and_values(reference, r1m_root, weights):
    assert isinstance(reference.descriptors, np.memmap) and reference.descriptors.dtype == np.float16
    assert reference.descriptors.shape == (N, 16) and not reference.descriptors.flags.writeable
    assert reference.valid_mask.all() and reference.missing == [] and len(reference.names) == N
    assert (reference.out_dir / "descriptors.f16").stat().st_size == N * 16 * 2
    assert reference.meta["chunks"] == 3
    from sg_train.extraction import extract_all

    model = build_model(weights)
    direct = extract_all(model, dataset(r1m_root, model), batch_size=BATCH_SIZE, progress=False)
    np.testing.assert_allclose(np.asarray(reference.descriptors, np.float32), direct.numpy(), atol=1e-3)
    assert np.array_equal(R1MDescriptors.open(reference.out_dir).descriptors, reference.descriptors)


def test_resume_after_sigkill_recomputes_nothing_finished(r1m_root, weights, reference, counted_model, tmp_path):
    out = tmp_path / "r1m"
    env = child_env()
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "r1m_kill_probe.py"), str(r1m_root), str(out),
                           weights, str(CHUNK)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "chunks" / "000000.json").exists() and not (out / "chunks" / "000001.json").exists()
    with pytest.raises(R1MExtractionError, match="incomplete: 2 of 3 chunks"):
        R1MDescriptors.open(out)

    resumed = _run(counted_model, r1m_root, out)
    assert counted_model.images_seen == N - CHUNK  # chunk 0 (rows 0-7) was not recomputed
    assert np.array_equal(np.asarray(resumed.descriptors), np.asarray(reference.descriptors))

    counted_model.images_seen = 0
    again = _run(counted_model, r1m_root, out)  # finished: nothing to do
    assert counted_model.images_seen == 0
    assert np.array_equal(np.asarray(again.descriptors), np.asarray(reference.descriptors))


def test_damaged_finished_chunk_is_recomputed(r1m_root, reference, counted_model, tmp_path):
    out = tmp_path / "r1m"
    shutil.copytree(reference.out_dir, out)
    data = np.memmap(out / "descriptors.f16", dtype=np.float16, mode="r+", shape=(N, 16))
    data[CHUNK + 1, 2] += 1  # a row of chunk 1
    data.flush()
    del data
    with pytest.warns(R1MChunkWarning, match=rf"rows {CHUNK}-{2 * CHUNK - 1} of finished chunk 1"):
        repaired = _run(counted_model, r1m_root, out)
    assert counted_model.images_seen == CHUNK
    assert np.array_equal(np.asarray(repaired.descriptors), np.asarray(reference.descriptors))


def test_another_model_or_setting_in_the_same_dir_is_refused(r1m_root, weights, reference, tmp_path):
    out = tmp_path / "r1m"
    shutil.copytree(reference.out_dir, out)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    torch.manual_seed(1)
    other = build_model()
    with pytest.raises(R1MExtractionError, match=r"something else \(model weights"):
        _run(other, r1m_root, out)
    with pytest.raises(R1MExtractionError, match=f"chunk size: {CHUNK} there, 10 now"):
        _run(build_model(weights), r1m_root, out, chunk_size=10)
    with pytest.raises(R1MExtractionError, match="scales: None there"):
        _run(build_model(weights), r1m_root, out, scales=[1.0, 0.5])
    with pytest.raises(R1MExtractionError, match="dtype"):
        _run(build_model(weights), r1m_root, out, dtype=np.float32)
    model = build_model(weights)
    with pytest.raises(R1MExtractionError, match=r"something else \(dataset"):
        extract_r1m(model, R1MDataset(r1m_root, mean=None, std=None, max_size=32), out, chunk_size=CHUNK,
                    progress=False)
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_foreign_files_are_not_overwritten(r1m_root, weights, tmp_path):
    out = tmp_path / "r1m"
    out.mkdir()
    (out / "descriptors.f16").write_bytes(b"someone else's")
    with pytest.raises(R1MExtractionError, match="refusing to overwrite"):
        _run(build_model(weights), r1m_root, out)
    assert (out / "descriptors.f16").read_bytes() == b"someone else's"


def test_pixels_unreadable_at_extraction_are_skipped_and_reported(r1m_root, weights, tmp_path):
    root = tmp_path / "revisitop1m"
    shutil.copytree(r1m_root, root)
    line = (root / "revisitop1m.txt").read_text().splitlines()[5]
    bad = root / "jpg" / line
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) * 2 // 3])  # truncated: header fine, pixels not
    res = _run(build_model(weights), root, tmp_path / "r1m", dtype=np.float32)
    assert (res.out_dir / "descriptors.f32").exists() and res.descriptors.dtype == np.float32
    assert not res.valid_mask[5] and res.valid_mask.sum() == N - 1
    assert [(r, n) for r, n, _ in res.missing] == [(5, line)] and "truncated" in res.missing[0][2]
    assert not np.asarray(res.descriptors[5]).any() and 5 not in res.valid_indices


def test_open_checks_the_model(reference, weights):
    assert R1MDescriptors.open(reference.out_dir, model=build_model(weights)).descriptors.shape == (N, 16)
    torch.manual_seed(5)
    with pytest.raises(R1MExtractionError, match="another model"):
        R1MDescriptors.open(reference.out_dir, model=build_model())


def test_extraction_records_are_strict_json(reference):
    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    records = [reference.out_dir / "meta.json", *sorted((reference.out_dir / "chunks").glob("*.json"))]
    assert len(records) > 1
    for path in records:
        text = path.read_text(encoding="utf-8")
        assert text.endswith("\n")
        json.loads(text, parse_constant=refuse)
