"""Every JSON file sg-train writes is strict JSON: non-finite numbers become null, numpy values
plain JSON, written atomically with indent 2 and a trailing newline."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sg_train.descriptor_cache import DescriptorCache
from sg_train.files import write_json

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("evaluate_cli_json", ROOT / "evaluate.py")
evaluate_cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(evaluate_cli)


def strict_load(path: Path):
    """Parse as strict JSON: NaN / Infinity are refused."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}, which is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_write_json_turns_every_non_finite_number_into_null(tmp_path):
    obj = {
        "nan": math.nan, "inf": -math.inf, "ok": 0.5, 3: "int key",
        "nested": [(np.float32("nan"), np.float64(0.25)), {"deep": [np.inf]}],
        "array": np.array([[1.0, np.nan], [np.inf, 2.0]], dtype=np.float16),
        "ints": np.arange(3, dtype=np.int64), "scalar": np.int32(7), "flag": np.bool_(True),
    }
    path = tmp_path / "results.json"
    write_json(path, obj)
    assert strict_load(path) == {
        "nan": None, "inf": None, "ok": 0.5, "3": "int key",
        "nested": [[None, 0.25], {"deep": [None]}],
        "array": [[1.0, None], [None, 2.0]], "ints": [0, 1, 2], "scalar": 7, "flag": True,
    }
    assert path.read_text().startswith('{\n  "nan": null')  # indent 2


def test_write_json_keeps_the_old_file_when_the_object_is_not_json(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json(path, {"a": object()})
    assert strict_load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_evaluate_json_is_strict_for_numpy_and_non_finite_numbers(tmp_path, monkeypatch, capsys):
    def fake_results(args, points):  # one result per sweep point (a single point here)
        nan32 = np.float32("nan")
        return {"toy": [{"mAP": {"E": np.float64(0.5), "M": nan32, "H": math.inf},
                        "mP": {"E": {1: nan32, 5: 0.5}}, "search": {"topk": 3}}]}

    monkeypatch.setattr(evaluate_cli, "evaluate_descriptor_files", fake_results)
    out = tmp_path / "out.json"
    assert evaluate_cli.main(["--descriptors", "Q.npy", "X.npy", "--gnd", "g.pkl", "--json", str(out)]) == 0, \
        capsys.readouterr().err
    assert strict_load(out) == {"toy": {"mAP": {"E": 0.5, "M": None, "H": None}, "mP": {"E": {"1": None, "5": 0.5}}}}


def test_descriptor_cache_record_is_strict_json(tmp_path):
    cache = DescriptorCache(tmp_path)
    cache.store({"model": "m", "scales": [1.0]}, torch.eye(3))
    (record,) = tmp_path.glob("*.json")
    assert strict_load(record)["shape"] == [3, 3]


def test_gldv2_split_file_is_strict_json(tmp_path):
    from datamodules.gldv2_index import build_gldv2_split

    csv = tmp_path / "train.csv"
    csv.write_text("id,url,landmark_id\n" + "".join(f"img{i:03d},u,{i % 3}\n" for i in range(12)))
    split = build_gldv2_split(csv, min_images_per_class=2, val_fraction=0.25, split_file=tmp_path / "split.json")
    record = strict_load(tmp_path / "split.json")
    assert record["num_val"] == len(split.val_ids) and record["val_fraction"] == 0.25
