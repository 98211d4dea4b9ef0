"""Synthetic landmarks generator: formats, determinism, disjointness, refusal, CLI."""
from __future__ import annotations

import csv
import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sg_train.synthetic import MARKER, OutputDirError, generate
from sg_train.synthetic.render import render_landmark, sample_landmark

TINY = dict(train_landmarks=4, views_per_landmark=3, bench_landmarks=2, queries_per_landmark=2,
            bench_positives=5, bench_distractors=7, r1m_distractors=5, image_size=64, progress=False)
REPO = Path(__file__).resolve().parents[1]


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "data"
    summary = generate(out, seed=3, workers=1, **TINY)
    return out, summary


def test_gldv2_format(tiny):
    out, summary = tiny
    with open(out / "gldv2" / "train.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["id", "url", "landmark_id"]
        rows = list(reader)
    assert len(rows) == 4 * 3 == summary["counts"]["train_images"]
    ids = [r[0] for r in rows]
    assert len(set(ids)) == len(ids)
    for image_id, url, landmark_id in rows:
        assert len(image_id) == 16 and all(c in "0123456789abcdef" for c in image_id)
        assert url == ""
        assert 0 <= int(landmark_id) < 203094
        p = out / "gldv2" / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"
        with Image.open(p) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and max(im.size) == 64
    by_landmark: dict[int, set] = {}
    for image_id, _, landmark_id in rows:
        by_landmark.setdefault(int(landmark_id), set()).add(image_id)
    assert len(by_landmark) == 4
    assert sorted(by_landmark) == summary["train_landmark_ids"]
    with open(out / "gldv2" / "train_clean.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["landmark_id", "images"]
        clean = list(reader)
    assert clean, "train_clean.csv is empty"
    for landmark_id, images in clean:
        listed = images.split(" ")
        assert listed and set(listed) <= by_landmark[int(landmark_id)]
    # no stray files: every image on disk is listed
    on_disk = {p.stem for p in (out / "gldv2" / "train").rglob("*.jpg")}
    assert on_disk == set(ids)


def test_revisited_format(tiny):
    out, summary = tiny
    root = out / "revisited" / "rsynth"
    with open(root / "gnd_rsynth.pkl", "rb") as f:
        cfg = pickle.load(f)
    assert type(cfg) is dict and set(cfg) == {"imlist", "qimlist", "gnd"}
    imlist, qimlist, gnd = cfg["imlist"], cfg["qimlist"], cfg["gnd"]
    assert all(type(n) is str and not n.endswith(".jpg") for n in imlist + qimlist)
    assert len(qimlist) == 2 * 2 == len(gnd) == summary["counts"]["bench_queries"]
    assert len(imlist) == 2 * 5 + 7 == summary["counts"]["bench_database"]
    assert len(set(imlist)) == len(imlist) and not set(imlist) & set(qimlist)
    n = len(imlist)
    for name in imlist + qimlist:
        assert (root / "jpg" / f"{name}.jpg").is_file()
    for q, g in enumerate(gnd):
        assert type(g) is dict and set(g) == {"bbx", "easy", "hard", "junk"}
        assert type(g["bbx"]) is list and len(g["bbx"]) == 4 and all(type(v) is float for v in g["bbx"])
        for key in ("easy", "hard", "junk"):
            assert type(g[key]) is list and all(type(i) is int and 0 <= i < n for i in g[key])
        e, h, j = set(g["easy"]), set(g["hard"]), set(g["junk"])
        assert not (e & h) and not (e & j) and not (h & j)
        assert len(e) >= 1 and len(h) >= 1, "each query needs an easy and a hard positive"
        with Image.open(root / "jpg" / f"{qimlist[q]}.jpg") as im:
            w, hgt = im.size
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= hgt
        assert (x2 - x1) * (y2 - y1) >= 0.1 * w * hgt, "query box should frame a large landmark"
        # positives of a query belong to its landmark; the two queries of a landmark share them
        lm = qimlist[q].split("_")[0]
        assert all(imlist[i].startswith(lm + "_") for i in e | h | j)
    assert gnd[0]["easy"] == gnd[1]["easy"] and gnd[0]["hard"] == gnd[1]["hard"]
    # distractors: positives of no query
    used = {i for g in gnd for k in ("easy", "hard", "junk") for i in g[k]}
    assert len(used) == 2 * 5 and n - len(used) == 7


def test_r1m_format(tiny):
    out, _ = tiny
    lines = (out / "revisitop1m" / "revisitop1m.txt").read_text().splitlines()
    assert len(lines) == 5 and len(set(lines)) == 5
    for line in lines:
        assert line.endswith(".jpg") and not line.startswith("/")
        assert (out / "revisitop1m" / "jpg" / line).is_file()


def test_marker_and_summary(tiny):
    out, summary = tiny
    assert (out / MARKER).is_file()
    stored = json.loads((out / "summary.json").read_text())
    assert stored["config"] == summary["config"] and stored["counts"] == summary["counts"]
    assert summary["counts"]["forced_views"] == 0
    # the marker is the newest file written
    newest = max(p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    assert (out / MARKER).stat().st_mtime_ns >= newest


def test_benchmark_landmarks_disjoint_from_training(tiny):
    _, summary = tiny
    seeds = summary["landmark_seeds"]
    train = {tuple(s) for s in seeds["train"]}
    bench = {tuple(s) for s in seeds["bench"]} | {tuple(s) for s in seeds["bench_distractor"]}
    assert train and bench and not train & bench
    # and their drawn identities differ
    def ident(key):
        return render_landmark(sample_landmark(np.random.default_rng(list(key)))).tobytes()
    assert not {ident(k) for k in train} & {ident(k) for k in bench}


def test_deterministic_and_worker_independent(tiny, tmp_path):
    out, _ = tiny
    again = tmp_path / "again"
    generate(again, seed=3, workers=2, **TINY)
    assert _tree_digest(out) == _tree_digest(again)


def test_distinct_seeds_differ(tiny, tmp_path):
    out, _ = tiny
    other = tmp_path / "other"
    generate(other, seed=4, workers=1, **TINY)
    a, b = _tree_digest(out / "revisited"), _tree_digest(other / "revisited")
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) >= 0.9 * len(a)
    ids_a = (out / "gldv2" / "train.csv").read_text()
    ids_b = (other / "gldv2" / "train.csv").read_text()
    assert ids_a != ids_b


def test_refuses_non_empty_directory(tmp_path):
    out = tmp_path / "user"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty"):
        generate(out, seed=0, workers=1, **TINY)
    assert (out / "precious.txt").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    # --overwrite replaces only the generator's own paths
    s = generate(out, seed=0, workers=1, overwrite=True, **TINY)
    assert not s["skipped"] and (out / MARKER).is_file()
    assert (out / "precious.txt").read_text() == "mine"


def test_complete_directory_is_reused_or_refused(tiny, tmp_path):
    out = tmp_path / "set"
    generate(out, seed=1, workers=1, **TINY)
    before = _tree_digest(out)
    s = generate(out, seed=1, workers=1, **TINY)  # same configuration: nothing to do
    assert s["skipped"] and _tree_digest(out) == before
    with pytest.raises(OutputDirError, match="different configuration"):
        generate(out, seed=2, workers=1, **TINY)
    assert _tree_digest(out) == before
    # an interrupted run (no marker) is refused too
    (out / MARKER).unlink()
    with pytest.raises(OutputDirError, match="no .complete"):
        generate(out, seed=1, workers=1, **TINY)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="bench_positives"):
        generate(tmp_path / "a", **{**TINY, "bench_positives": 1})
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path / "b", **{**TINY, "image_size": 8})
    with pytest.raises(ValueError, match="bench_name"):
        generate(tmp_path / "c", bench_name="../x", **TINY)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _cli(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "sg_train.synthetic", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli(tmp_path):
    out = tmp_path / "cli"
    args = ["--out", str(out), "--seed", "5", "--train-landmarks", "3", "--views-per-landmark", "2",
            "--bench-landmarks", "2", "--queries-per-landmark", "1", "--bench-positives", "3",
            "--bench-distractors", "4", "--image-size", "48", "--workers", "2"]
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / MARKER).is_file() and (out / "revisited" / "rsynth" / "gnd_rsynth.pkl").is_file()
    assert not (out / "revisitop1m").exists()
    assert json.loads(r.stdout[r.stdout.index("{"):])["counts"]["train_images"] == 6
    r = _cli(*args, cwd=tmp_path)  # same again: nothing to do
    assert r.returncode == 0 and "already complete" in r.stdout
    (out / MARKER).unlink()
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode != 0 and "--overwrite" in r.stderr
    r = _cli(*args, "--overwrite", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (out / MARKER).is_file()
