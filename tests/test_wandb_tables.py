"""What the model retrieves, every evaluation: the W&B example table (rows, thumbnails, AP), the same
grids as PNGs in the run folder, the curves at the end, and the descriptor sets as artifacts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

import train
import wandb_records
from test_runs import demo_config

from sg_train.retrieval import load_gnd
from sg_train.retrieval.examples import select_queries


def test_examples_tables_pngs_curves_and_descriptor_artifacts(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data, max_epochs=2, limit_train_batches=1, limit_val_batches=1,
                         retrieval={"rerank": True, "M": 10, "K": 2, "examples": 3, "examples_k": 4,
                                    "log_descriptors": True, "evaluate_before_training": True})
    train.main(["fit", "--config", str(config)])
    run_dir = tmp_path / "run"

    # PNG grids, one per evaluation, and the curves figure
    pngs = sorted(p.name for p in (run_dir / "retrieval_examples" / "rsynth").iterdir())
    assert pngs == ["before_training_epoch000.png", "trained_epoch000.png", "trained_epoch001.png"]
    for name in pngs + ["../../retrieval_curves.png"]:
        with Image.open(run_dir / "retrieval_examples" / "rsynth" / name) as image:
            assert image.format == "PNG" and image.width >= 400

    # the W&B table of every evaluation: a run_table artifact (the history row only points at it)
    run_file = wandb_records.run_file(run_dir / "wandb")
    rows = [row for row in wandb_records.history(run_file) if "retrieval_examples/rsynth/_type" in row]
    assert [row["retrieval_examples/rsynth/nrows"] for row in rows] == [3, 3, 3]
    tables = [a for a in wandb_records.artifacts(run_file) if a["type"] == "run_table"]
    assert len(tables) == 3 and all("retrieval_examplesrsynth" in a["name"] for a in tables)
    local = tables[-1]["local"]
    (table_file,) = [name for name in local if name.endswith(".table.json")]
    table = json.loads(local[table_file].read_text())
    columns = table["columns"]
    assert columns[:6] == ["stage", "epoch", "query", "query image", "results", "relevance"]
    assert columns[6:] == ["AP E", "AP M", "AP H", "results reranked", "relevance reranked",
                           "rerank AP E", "rerank AP M", "rerank AP H"]
    qimlist = load_gnd(synthetic_data / "revisited" / "rsynth" / "gnd_rsynth.pkl")["qimlist"]
    assert [Path(dict(zip(columns, row))["query"]).stem for row in table["data"]] == [
        qimlist[i] for i in select_queries(len(qimlist), 3)]  # the same queries every evaluation
    for row in table["data"]:
        cells = dict(zip(columns, row))
        assert cells["stage"] == "trained" and cells["epoch"] == 1
        assert all(r in {"easy", "hard", "junk", "negative"} for r in cells["relevance"].split())
        assert len(cells["relevance reranked"].split()) == 4
        assert all(cells[c] is None or 0 <= cells[c] <= 1 for c in columns if "AP" in c)
        for column in ("query image", "results", "results reranked"):
            assert cells[column]["_type"] == "image-file"
            with Image.open(local[cells[column]["path"]]) as thumb:
                assert thumb.height == 128 and thumb.width == (4 * 128 if column.startswith("results") else 128)

    # the last evaluation's descriptors, as a dataset artifact evaluate.py --descriptors can read
    (descriptors,) = [a for a in wandb_records.artifacts(run_file) if a["type"] == "dataset"]
    assert descriptors["name"].startswith("descriptors-rsynth-")
    assert sorted(descriptors["files"]) == ["database.npy", "gnd_rsynth.pkl", "queries.npy"]
    meta = descriptors["metadata"]
    assert meta["epoch"] == 1 and meta["stage"] == "trained" and meta["dim"] == 32
    assert meta["metrics"]["rerank_mAP"]["M"] == json.loads((run_dir / "results.json").read_text())[
        "trained"]["per_dataset"]["rsynth"]["rerank_mAP"]["M"]


def test_asking_for_descriptors_without_wandb_says_none_are_logged(tmp_path, synthetic_data):
    config = demo_config(tmp_path, synthetic_data, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                         retrieval={"rerank": False, "examples": 0, "log_descriptors": True})
    with pytest.warns(Warning, match="no descriptors are logged: the run has no enabled W&B logger"):
        train.main(["fit", "--config", str(config), "--trainer.logger=false"])
