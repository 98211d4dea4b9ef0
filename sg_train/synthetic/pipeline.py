"""Plan, render (in parallel) and write the synthetic data set.

Every image has its own random generator, seeded by ``(seed, domain, landmark, view)``, so
the bytes written do not depend on the number of workers or on the order jobs finish in.
The domains keep training landmarks, benchmark landmarks, benchmark distractors and R1M
distractors apart: no benchmark landmark is ever a training landmark.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sg_train.errors import UserInputError

from . import writers
from .render import render_landmark, sample_landmark
from .views import category_ok, render_clutter, render_view, sample_view

FORMAT_VERSION = 1
MARKER = ".complete"
SUMMARY = "summary.json"

# generator domains (the second entry of every seed tuple)
TRAIN, BENCH, BENCH_DISTRACTOR, CLUTTER, R1M_LANDMARK, R1M_CLUTTER, PLAN = 1, 2, 3, 4, 5, 6, 7
GLDV2_LANDMARK_ID_RANGE = 203094  # real GLDv2 landmark ids lie in [0, 203094)
MAX_TRIES = 40
DISTRACTOR_VIEWS = 5              # views per distractor landmark


class OutputDirError(UserInputError, RuntimeError):
    """The output directory holds something we must not overwrite."""


@dataclass
class Job:
    kind: str                     # "landmark" or "clutter"
    domain: int
    index: int
    paths: list[str]              # absolute output paths, one per image
    categories: list[str] = field(default_factory=list)
    views: list[int] = field(default_factory=list)  # per-image generator index


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _run_job(args) -> list[dict]:
    job, seed, long_side = args
    out = []
    if job.kind == "landmark":
        spec = sample_landmark(_rng(seed, job.domain, job.index))
        canvas = render_landmark(spec)
        for path, cat, k in zip(job.paths, job.categories, job.views):
            rng = _rng(seed, job.domain, job.index, k)
            for attempt in range(MAX_TRIES):
                view = sample_view(rng, cat, long_side)
                img, bbx, stats = render_view(canvas, view, rng)
                if category_ok(cat, stats, view):
                    break
            writers.write_bytes(path, writers.encode_jpeg(img, view.quality))
            out.append({"bbx": bbx, "visible": stats["visible"], "tries": attempt + 1,
                        "forced": not category_ok(cat, stats, view), "size": [view.width, view.height]})
    else:
        for path, k in zip(job.paths, job.views):
            rng = _rng(seed, job.domain, k)
            img = render_clutter(rng, long_side)
            writers.write_bytes(path, writers.encode_jpeg(img, int(rng.integers(72, 96))))
            out.append({"bbx": None, "visible": 0.0, "tries": 1, "forced": False,
                        "size": [img.shape[1], img.shape[0]]})
    return out


def _init_worker() -> None:
    import cv2

    cv2.setNumThreads(1)


def _positive_categories(n: int) -> list[str]:
    """Split a query landmark's ``n`` database views into easy / hard / junk (≥1 easy, ≥1 hard)."""
    n_junk = int(round(0.2 * n)) if n >= 4 else 0
    n_easy = (n - n_junk + 1) // 2
    return ["easy"] * n_easy + ["hard"] * (n - n_junk - n_easy) + ["junk"] * n_junk


def _check_args(cfg: dict) -> None:
    ints = ("train_landmarks", "views_per_landmark", "bench_landmarks", "queries_per_landmark",
            "bench_positives", "bench_distractors", "r1m_distractors", "image_size")
    for k in ints:
        if not isinstance(cfg[k], (int, np.integer)) or isinstance(cfg[k], bool):
            raise TypeError(f"{k} must be an int, got {cfg[k]!r}")
    if cfg["train_landmarks"] < 1 or cfg["views_per_landmark"] < 1:
        raise ValueError("train_landmarks and views_per_landmark must be >= 1")
    if cfg["bench_landmarks"] < 1 or cfg["queries_per_landmark"] < 1:
        raise ValueError("bench_landmarks and queries_per_landmark must be >= 1")
    if cfg["bench_positives"] < 2:
        raise ValueError("bench_positives must be >= 2 (each query needs an easy and a hard positive)")
    if cfg["bench_distractors"] < 0 or cfg["r1m_distractors"] < 0:
        raise ValueError("bench_distractors and r1m_distractors must be >= 0")
    if not 32 <= cfg["image_size"] <= 4096:
        raise ValueError(f"image_size must be in [32, 4096], got {cfg['image_size']}")
    name = cfg["bench_name"]
    if not name or not all(c.isalnum() or c in "_-" for c in name):
        raise ValueError(f"bench_name must be a plain name (letters, digits, _ or -), got {name!r}")


def _prepare_out(out: Path, cfg: dict, overwrite: bool) -> dict | None:
    """Make ``out`` ready; returns the existing summary when an identical set is already complete."""
    ours = ["gldv2", f"revisited/{cfg['bench_name']}", "revisitop1m", SUMMARY, MARKER]
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        complete = (out / MARKER).exists()
        if not overwrite:
            if complete:
                try:
                    prev = json.loads((out / SUMMARY).read_text())
                except (OSError, ValueError):
                    prev = None
                if prev is not None and prev.get("config") == cfg:
                    return prev
                raise OutputDirError(
                    f"{out} already holds a complete synthetic data set made with a different "
                    f"configuration; pass --overwrite (overwrite=True) to replace it, or choose another --out")
            raise OutputDirError(
                f"{out} is not empty and has no {MARKER} marker (not a finished synthetic data set: "
                f"user data or an interrupted run); refusing to write into it. Pass --overwrite "
                f"(overwrite=True) to replace the generator's own paths there ({', '.join(ours)}), "
                f"or choose an empty/new --out")
        (out / MARKER).unlink(missing_ok=True)
        for rel in ours:
            p = out / rel
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return None


def generate(out_dir, *, seed: int = 0, train_landmarks: int = 300, views_per_landmark: int = 12,
             bench_landmarks: int = 25, queries_per_landmark: int = 2, bench_positives: int = 24,
             bench_distractors: int = 250, r1m_distractors: int = 0, image_size: int = 128,
             bench_name: str = "rsynth", workers: int | None = None, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Generate the synthetic landmarks data set under ``out_dir``; see the package docstring."""
    t_start = time.perf_counter()
    cfg = {
        "format_version": FORMAT_VERSION, "seed": int(seed), "train_landmarks": train_landmarks,
        "views_per_landmark": views_per_landmark, "bench_landmarks": bench_landmarks,
        "queries_per_landmark": queries_per_landmark, "bench_positives": bench_positives,
        "bench_distractors": bench_distractors, "r1m_distractors": r1m_distractors,
        "image_size": image_size, "bench_name": bench_name,
    }
    _check_args(cfg)
    out = Path(out_dir)
    prev = _prepare_out(out, cfg, overwrite)
    if prev is not None:
        prev = dict(prev)
        prev["skipped"] = True
        prev["seconds"] = 0.0
        return prev

    gld = out / "gldv2"
    rev = out / "revisited" / bench_name
    r1m = out / "revisitop1m"
    jobs: list[Job] = []

    # ---- training landmarks (GLDv2 format) -------------------------------------------
    plan = _rng(seed, PLAN, TRAIN)
    lm_ids = np.sort(plan.choice(GLDV2_LANDMARK_ID_RANGE, size=train_landmarks, replace=False)) \
        if train_landmarks <= GLDV2_LANDMARK_ID_RANGE else np.arange(train_landmarks)
    train_rows: list[tuple[str, int]] = []
    train_cats: list[list[str]] = []
    for L in range(train_landmarks):
        cats = [str(c) for c in plan.choice(["easy", "hard", "junk"], size=views_per_landmark,
                                            p=[0.66, 0.31, 0.03])]
        ids = [writers.hex_id("sg-synth", seed, TRAIN, L, k) for k in range(views_per_landmark)]
        train_rows += [(i, int(lm_ids[L])) for i in ids]
        train_cats.append(cats)
        jobs.append(Job("landmark", TRAIN, L, [str(writers.gldv2_image_path(gld, i)) for i in ids],
                        cats, list(range(views_per_landmark))))
    if len({r[0] for r in train_rows}) != len(train_rows):
        raise RuntimeError("image id collision; choose another seed")

    # ---- benchmark (Revisited format) --------------------------------------------------
    bench_plan = _rng(seed, PLAN, BENCH)
    pos_cats = _positive_categories(bench_positives)
    qimlist: list[str] = []
    db_names: list[str] = []
    db_owner: list[tuple[int, str]] = []  # (bench landmark or -1, category)
    query_jobs: list[int] = []
    for j in range(bench_landmarks):
        cats = list(pos_cats)
        bench_plan.shuffle(cats)
        qn = [f"b{j:03d}_query{k}" for k in range(queries_per_landmark)]
        pn = [f"b{j:03d}_{k:03d}" for k in range(bench_positives)]
        qimlist += qn
        db_names += pn
        db_owner += [(j, c) for c in cats]
        query_jobs.append(len(jobs))
        jobs.append(Job("landmark", BENCH, j, [str(rev / "jpg" / f"{n}.jpg") for n in qn + pn],
                        ["query"] * queries_per_landmark + cats,
                        list(range(queries_per_landmark + bench_positives))))
    n_lm_distr = bench_distractors // 2
    n_clutter = bench_distractors - n_lm_distr
    for j in range((n_lm_distr + DISTRACTOR_VIEWS - 1) // DISTRACTOR_VIEWS):
        nv = min(DISTRACTOR_VIEWS, n_lm_distr - j * DISTRACTOR_VIEWS)
        cats = [str(c) for c in bench_plan.choice(["easy", "hard", "junk"], size=nv, p=[0.45, 0.45, 0.1])]
        names = [f"x{j:03d}_{k:03d}" for k in range(nv)]
        db_names += names
        db_owner += [(-1, c) for c in cats]
        jobs.append(Job("landmark", BENCH_DISTRACTOR, j, [str(rev / "jpg" / f"{n}.jpg") for n in names],
                        cats, list(range(nv))))
    clutter_names = [f"clutter_{k:05d}" for k in range(n_clutter)]
    db_names += clutter_names
    db_owner += [(-1, "clutter")] * n_clutter
    for start in range(0, n_clutter, 16):
        ks = list(range(start, min(n_clutter, start + 16)))
        jobs.append(Job("clutter", CLUTTER, start, [str(rev / "jpg" / f"{clutter_names[k]}.jpg") for k in ks],
                        views=ks))

    # ---- R1M-format distractors --------------------------------------------------------
    r1m_lines: list[str] = []
    if r1m_distractors > 0:
        n_lm = r1m_distractors // 2
        n_cl = r1m_distractors - n_lm
        for j in range((n_lm + DISTRACTOR_VIEWS - 1) // DISTRACTOR_VIEWS):
            nv = min(DISTRACTOR_VIEWS, n_lm - j * DISTRACTOR_VIEWS)
            ids = [writers.hex_id("sg-synth", seed, R1M_LANDMARK, j, k) for k in range(nv)]
            rel = [f"{i[:2]}/{i}.jpg" for i in ids]
            r1m_lines += rel
            cats = [str(c) for c in _rng(seed, PLAN, R1M_LANDMARK, j).choice(["easy", "hard"], size=nv)]
            jobs.append(Job("landmark", R1M_LANDMARK, j, [str(r1m / "jpg" / r) for r in rel], cats, list(range(nv))))
        ids = [writers.hex_id("sg-synth", seed, R1M_CLUTTER, k) for k in range(n_cl)]
        rel = [f"{i[:2]}/{i}.jpg" for i in ids]
        r1m_lines += rel
        for start in range(0, n_cl, 16):
            ks = list(range(start, min(n_cl, start + 16)))
            jobs.append(Job("clutter", R1M_CLUTTER, start, [str(r1m / "jpg" / rel[k]) for k in ks], views=ks))
        if len(set(r1m_lines)) != len(r1m_lines):
            raise RuntimeError("R1M image id collision; choose another seed")

    # ---- render ------------------------------------------------------------------------
    n_images = sum(len(j.paths) for j in jobs)
    results: list[list[dict] | None] = [None] * len(jobs)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    workers = max(1, int(workers))
    from sg_train.progress import progress_bar

    bar = progress_bar(total=n_images, unit="img", desc="synthetic landmarks", enabled=progress)
    args = [(job, int(seed), image_size) for job in jobs]
    try:
        if workers == 1:
            for i, a in enumerate(args):
                results[i] = _run_job(a)
                bar.update(len(results[i]))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, initializer=_init_worker) as pool:
                for i, res in pool.imap_unordered(_indexed, list(enumerate(args)), chunksize=1):
                    results[i] = res
                    bar.update(len(res))
    finally:
        bar.close()

    # ---- write the index files ---------------------------------------------------------
    clean: dict[int, list[str]] = {}
    for L, cats in enumerate(train_cats):
        ids = [r[0] for r in train_rows[L * views_per_landmark:(L + 1) * views_per_landmark]]
        clean[int(lm_ids[L])] = [i for i, c in zip(ids, cats) if c != "junk"]
    writers.write_gldv2_csvs(gld, train_rows, clean)

    order = _rng(seed, PLAN, BENCH, 1).permutation(len(db_names))
    imlist = [db_names[i] for i in order]
    pos_of = {name: p for p, name in enumerate(imlist)}
    gnd = []
    for j in range(bench_landmarks):
        res = results[query_jobs[j]]
        owned = [(db_names[i], db_owner[i][1]) for i in range(len(db_names)) if db_owner[i][0] == j]
        for k in range(queries_per_landmark):
            w, h = res[k]["size"]
            bbx = res[k]["bbx"] or [0.0, 0.0, float(w), float(h)]  # (a query always shows its landmark)
            g = {"bbx": bbx, "easy": [], "hard": [], "junk": []}
            for name, cat in owned:
                g[cat].append(pos_of[name])
            for key in ("easy", "hard", "junk"):
                g[key].sort()
            gnd.append(g)
    gnd_path = writers.write_revisited_gnd(out / "revisited", bench_name, imlist, qimlist, gnd)
    if r1m_lines:
        writers.write_r1m_list(out, r1m_lines)

    flat = [r for res in results for r in res]
    summary = {
        "config": cfg,
        "counts": {
            "train_images": len(train_rows),
            "train_clean_images": sum(len(v) for v in clean.values()),
            "train_landmarks": train_landmarks,
            "bench_queries": len(qimlist),
            "bench_database": len(imlist),
            "bench_positives": bench_landmarks * bench_positives,
            "bench_distractors": bench_distractors,
            "r1m_distractors": len(r1m_lines),
            "images": n_images,
            "forced_views": int(sum(r["forced"] for r in flat)),
        },
        "paths": {
            "gldv2_root": "gldv2",
            "train_csv": "gldv2/train.csv",
            "train_clean_csv": "gldv2/train_clean.csv",
            "revisited_root": "revisited",
            "bench_name": bench_name,
            "gnd": str(gnd_path.relative_to(out)),
            "bench_images": f"revisited/{bench_name}/jpg",
            "r1m_root": "revisitop1m" if r1m_lines else None,
            "r1m_list": "revisitop1m/revisitop1m.txt" if r1m_lines else None,
        },
        "train_landmark_ids": [int(x) for x in lm_ids],
        "landmark_seeds": {
            "train": [[int(seed), TRAIN, L] for L in range(train_landmarks)],
            "bench": [[int(seed), BENCH, j] for j in range(bench_landmarks)],
            "bench_distractor": [[int(seed), BENCH_DISTRACTOR, j]
                                 for j in range((n_lm_distr + DISTRACTOR_VIEWS - 1) // DISTRACTOR_VIEWS)],
        },
    }
    writers.write_bytes(out / SUMMARY, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    writers.write_bytes(out / MARKER, f"sg-train synthetic landmarks v{FORMAT_VERSION}\n".encode())
    summary = dict(summary)
    summary["skipped"] = False
    summary["seconds"] = round(time.perf_counter() - t_start, 3)
    summary["workers"] = workers
    summary["out_dir"] = str(out)
    return summary


def _indexed(item):
    i, a = item
    return i, _run_job(a)
