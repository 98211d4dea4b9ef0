"""GLDv2 datamodule: CSV formats and errors, filter, split, relabelling, state, robust loading."""

import json
import os
import random
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from datamodules import (
    ClassMappingError,
    GLDv2CSVError,
    GLDv2DataModule,
    ImageDataset,
    SkipFailedCollate,
    SplitFileError,
    build_gldv2_split,
    build_train_transform,
    gldv2_image_path,
    read_gldv2_csv,
    split_failed,
    worker_init_fn,
)
from datamodules.gldv2_index import stratified_split

# landmark id -> number of images (class 40 has one image: dropped by min_images_per_class=2)
CLASSES = {10: 6, 20: 4, 30: 2, 40: 1, 55: 12}


def _write_jpeg(path, rng, size=(24, 32)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arr = (rng.random((*size, 3)) * 255).astype(np.uint8)
    Image.fromarray(arr).save(path, "JPEG", quality=90)


def make_gldv2(root, classes=CLASSES, seed=0, bad=None, shuffle=True):
    """Tiny GLDv2 layout: train/<a>/<b>/<c>/<id>.jpg, train.csv and train_clean.csv.

    ``bad``: {row number: kind} with kind in truncated/garbage/missing/empty.
    Returns (rows [(id, landmark_id)], {path: kind} of bad files).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for lid, n in classes.items():
        for _ in range(n):
            iid = f"{int(rng.integers(0, 2**62)):016x}"
            rows.append((iid, lid))
            _write_jpeg(gldv2_image_path(str(root / "train"), iid), rng)
    if shuffle:
        random.Random(seed).shuffle(rows)
    bad_paths = {}
    for i, kind in (bad or {}).items():
        p = gldv2_image_path(str(root / "train"), rows[i][0])
        f = Path(p)
        if kind == "truncated":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        elif kind == "garbage":
            f.write_bytes(b"this is not an image" * 20)
        elif kind == "empty":
            f.write_bytes(b"")
        elif kind == "missing":
            f.unlink()
        bad_paths[p] = kind
    df = pd.DataFrame(
        {"id": [r[0] for r in rows], "url": [f"http://x/{r[0]}" for r in rows], "landmark_id": [r[1] for r in rows]}
    )
    df.to_csv(root / "train.csv", index=False)
    clean = df.groupby("landmark_id")["id"].agg(" ".join).reset_index().rename(columns={"id": "images"})
    clean.to_csv(root / "train_clean.csv", index=False)
    return rows, bad_paths


@pytest.fixture
def gld(tmp_path):
    rows, _ = make_gldv2(tmp_path)
    return tmp_path, rows


def _dm(root, **kw):
    kw.setdefault("image_size", 32)
    kw.setdefault("batch_size", 4)
    kw.setdefault("num_workers", 0)
    return GLDv2DataModule(data_root=str(root), **kw)


# ----------------------------------------------------------------------------- CSV formats / errors


def test_train_and_clean_csv_read_the_same(gld):
    root, rows = gld
    a = read_gldv2_csv(root / "train.csv")
    b = read_gldv2_csv(root / "train_clean.csv")
    assert (a.format, b.format) == ("train", "clean")
    assert len(a.ids) == len(rows) == sum(CLASSES.values())
    np.testing.assert_array_equal(a.ids, b.ids)  # both sorted by id
    np.testing.assert_array_equal(a.landmark_ids, b.landmark_ids)
    expect = dict(rows)
    assert all(expect[i.decode()] == lid for i, lid in zip(a.ids, a.landmark_ids))
    for csv in ("train.csv", "train_clean.csv", str(root / "train_clean.csv")):  # absolute path too
        dm = _dm(root, csv=csv, val_fraction=0)
        assert dm.num_classes == 4 and dm.landmark_ids == [10, 20, 30, 55]


@pytest.mark.parametrize(
    "name,header,line,missing",
    [
        ("train.csv", "id,url,lid", "abcdef,u,1", "landmark_id"),
        ("train.csv", "image,url,landmark_id", "abcdef,u,1", "id"),
        ("train_clean.csv", "landmark_id,ids", "1,abcdef", "images"),
    ],
)
def test_missing_column_names_file_and_column(tmp_path, name, header, line, missing):
    p = tmp_path / name
    p.write_text(f"{header}\n{line}\n")
    with pytest.raises(GLDv2CSVError) as e:
        read_gldv2_csv(p)
    msg = str(e.value)
    assert str(p) in msg and repr(missing) in msg and "columns present" in msg
    for col in header.split(","):
        assert col in msg


@pytest.mark.parametrize("bad", ["abc", "1.5", "", "12x"])
def test_non_integer_landmark_id_names_the_row(tmp_path, bad):
    p = tmp_path / "train.csv"
    p.write_text(f"id,url,landmark_id\naaaa1,u,1\naaaa2,u,2\naaaa3,u,{bad}\naaaa4,u,4\n")
    with pytest.raises(GLDv2CSVError, match=r"row 3 \(line 4\).*not an integer") as e:
        read_gldv2_csv(p)
    assert str(p) in str(e.value)


def test_non_integer_landmark_id_in_clean_csv(tmp_path):
    p = tmp_path / "train_clean.csv"
    p.write_text("landmark_id,images\n1,aaaa1 aaaa2\nparis,aaaa3\n")
    with pytest.raises(GLDv2CSVError, match=r"row 2 \(line 3\): landmark_id 'paris'"):
        read_gldv2_csv(p)


def test_other_csv_errors(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(GLDv2CSVError, match="empty file"):
        read_gldv2_csv(tmp_path / "empty.csv")
    (tmp_path / "dup.csv").write_text("id,url,landmark_id\naaaa1,u,1\naaaa1,u,2\n")
    with pytest.raises(GLDv2CSVError, match="'aaaa1' is listed more than once"):
        read_gldv2_csv(tmp_path / "dup.csv")
    (tmp_path / "noid.csv").write_text("id,url,landmark_id\naaaa1,u,1\n,u,2\n")
    with pytest.raises(GLDv2CSVError, match=r"row 2 \(line 3\): empty image id"):
        read_gldv2_csv(tmp_path / "noid.csv")
    with pytest.raises(FileNotFoundError, match="nothere.csv"):
        read_gldv2_csv(tmp_path / "nothere.csv")


def test_long_ids_are_not_truncated(tmp_path):
    long_id = "f" * 100
    (tmp_path / "train.csv").write_text(f"id,url,landmark_id\n{long_id},u,1\nabc,u,1\n")
    rows = read_gldv2_csv(tmp_path / "train.csv")
    assert sorted(x.decode() for x in rows.ids) == ["abc", long_id]


def test_empty_after_filter_names_the_value(gld):
    root, _ = gld
    with pytest.raises(GLDv2CSVError, match=r"min_images_per_class=50.*largest class has 12"):
        _ = _dm(root, min_images_per_class=50).num_classes


# ----------------------------------------------------------------------------- filter, labels, split


def test_min_images_filter_and_contiguous_relabelling(gld):
    root, rows = gld
    dm = _dm(root, min_images_per_class=3, val_fraction=0)
    assert dm.landmark_ids == [10, 20, 55] and dm.num_classes == 3
    assert dm.class_counts.dtype == torch.long and dm.class_counts.tolist() == [6, 4, 12]
    s = dm.split
    expect = dict(rows)
    for iid, lab in zip(s.train_ids, s.train_labels):
        assert dm.landmark_ids[lab] == expect[iid.decode()]
    dm1 = _dm(root, min_images_per_class=1, val_fraction=0)
    assert dm1.landmark_ids == [10, 20, 30, 40, 55] and dm1.class_counts.tolist() == [6, 4, 2, 1, 12]


def test_split_stratified_and_deterministic(gld):
    root, _ = gld
    kw = {"min_images_per_class": 1, "val_fraction": 0.3, "seed": 3}
    a = build_gldv2_split(root / "train.csv", **kw)
    b = build_gldv2_split(root / "train_clean.csv", **kw)
    np.testing.assert_array_equal(a.val_ids, b.val_ids)
    np.testing.assert_array_equal(a.train_ids, b.train_ids)
    assert set(a.val_labels.tolist()) <= set(a.train_labels.tolist())  # every val class is in train
    assert len(set(a.val_ids.tolist()) & set(a.train_ids.tolist())) == 0
    n = np.bincount(np.concatenate([a.train_labels, a.val_labels]))
    nv = np.bincount(a.val_labels, minlength=len(n))
    for c in range(len(n)):
        lo, hi = int(np.floor(n[c] * 0.3)), int(np.ceil(n[c] * 0.3))
        assert min(lo, n[c] - 1) <= nv[c] <= min(hi, n[c] - 1)
    assert nv[a.landmark_ids.tolist().index(40)] == 0  # a class of one image stays in train
    again = build_gldv2_split(root / "train.csv", **kw)
    np.testing.assert_array_equal(a.val_ids, again.val_ids)
    c = build_gldv2_split(root / "train.csv", min_images_per_class=1, val_fraction=0.3, seed=4)
    assert len(a.val_ids) != len(c.val_ids) or not np.array_equal(a.val_ids, c.val_ids)


def test_split_independent_of_csv_row_order(tmp_path):
    root = tmp_path
    make_gldv2(root)
    df = pd.read_csv(root / "train.csv")
    df.iloc[::-1].to_csv(root / "reversed.csv", index=False)
    a = build_gldv2_split(root / "train.csv", val_fraction=0.25, seed=0)
    b = build_gldv2_split(root / "reversed.csv", val_fraction=0.25, seed=0)
    np.testing.assert_array_equal(a.val_ids, b.val_ids)


def test_stratified_split_fraction_on_many_classes():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 60, 5000)
    labels = np.repeat(np.arange(5000), counts)
    m = stratified_split(labels, 0.05, seed=1)
    assert abs(m.mean() - 0.05) < 0.003
    nv = np.bincount(labels[m], minlength=5000)
    assert np.all(nv <= np.maximum(counts - 1, 0))
    assert np.all(nv <= np.ceil(counts * 0.05)) and np.all(nv >= np.minimum(np.floor(counts * 0.05), counts - 1))
    np.testing.assert_array_equal(m, stratified_split(labels, 0.05, seed=1))
    assert not stratified_split(labels, 0.0, seed=1).any()


# ----------------------------------------------------------------------------- split file


def test_split_file_written_once_and_reused(gld):
    root, _ = gld
    dm = _dm(root, val_fraction=0.3)
    path = dm.split_file
    assert path == str(root / "splits" / "train_clean_min2_val0.3_seed0.json")
    val = sorted(x.decode() for x in dm.split.val_ids)
    obj = json.loads(Path(path).read_text())
    assert obj["val_ids"] == val and obj["num_images"] == 24 and obj["num_classes"] == 4
    assert [f for f in os.listdir(root / "splits") if f.endswith(".tmp")] == []
    # the file, not the seed, decides on the second run: move one val image to train in the file
    obj["val_ids"] = val[1:]
    obj["num_val"] = len(val) - 1
    Path(path).write_text(json.dumps(obj))
    dm2 = _dm(root, val_fraction=0.3)
    assert sorted(x.decode() for x in dm2.split.val_ids) == val[1:]
    assert dm2.class_counts.sum() == 24 - len(val) + 1


def test_split_file_mismatch_is_refused(gld):
    root, _ = gld
    dm = _dm(root, csv="train.csv", val_fraction=0.3)
    val = {x.decode() for x in dm.split.val_ids}
    df = pd.read_csv(root / "train.csv")
    df = df[df["id"] != min(val)]  # a validation image vanishes from the CSV
    df.to_csv(root / "train.csv", index=False)
    with pytest.raises(SplitFileError) as e:
        _ = _dm(root, csv="train.csv", val_fraction=0.3).num_classes
    assert dm.split_file in str(e.value) and "not in the CSV" in str(e.value)
    (root / "bad.json").write_text('{"hello": 1}')
    with pytest.raises(SplitFileError, match="bad.json"):
        _ = _dm(root, csv="train.csv", split_file=str(root / "bad.json")).num_classes


def test_split_file_count_mismatch_is_refused(gld):
    root, _ = gld
    dm = _dm(root, val_fraction=0.3)
    assert dm.num_classes == 4  # writes the split file
    # the same file, with more classes kept
    with pytest.raises(SplitFileError, match="made for 24 images"), pytest.warns(UserWarning, match="was made with"):
        _ = _dm(root, val_fraction=0.3, min_images_per_class=1, split_file=dm.split_file).num_classes


def test_unwritable_split_file_is_named(gld):
    root, _ = gld
    (root / "a_file").write_text("not a folder")
    target = root / "a_file" / "split.json"
    with pytest.raises(OSError, match="cannot write split file .*a_file/split.json.*set split_file"):
        _ = _dm(root, val_fraction=0.3, split_file=str(target)).num_classes
    assert (root / "a_file").read_text() == "not a folder"


# ----------------------------------------------------------------------------- state dict


def test_state_dict_round_trip_and_mismatch(gld):
    root, _ = gld
    dm = _dm(root)
    sd = dm.state_dict()
    assert sd["landmark_ids"] == [10, 20, 30, 55] and sd["num_classes"] == 4
    assert sd["csv"] == "train_clean.csv" and sd["split_file"] == dm.split_file
    _dm(root).load_state_dict(sd)  # same data: fine
    with pytest.raises(ClassMappingError, match=r"checkpoint has 4 classes.*data has 5"):
        _dm(root, min_images_per_class=1).load_state_dict(sd)
    sd2 = dict(sd, landmark_ids=[10, 20, 31, 55])
    with pytest.raises(
        ClassMappingError, match="first difference at label 2: checkpoint landmark 31, data landmark 30"
    ):
        _dm(root).load_state_dict(sd2)


# ----------------------------------------------------------------------------- loading


def _epoch(loader):
    seen, failed, n_batches = [], [], 0
    for batch in loader:
        n_batches += 1
        assert set(batch) == {"image", "label", "index", "failed"}
        b = batch["image"].shape[0]
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (3, 32, 32)
        assert batch["label"].dtype == torch.long and batch["label"].shape == (b,)
        assert batch["index"].dtype == torch.long and batch["index"].shape == (b,)
        seen += list(zip(batch["index"].tolist(), batch["label"].tolist()))
        assert all(isinstance(f, str) and f.count("\t") == 1 for f in batch["failed"])
        failed += [split_failed(f) for f in batch["failed"]]
    return seen, failed, n_batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_skipped_and_listed(tmp_path, num_workers):
    bad = {0: "truncated", 1: "garbage", 2: "missing", 3: "empty"}
    _, bad_paths = make_gldv2(tmp_path, bad=bad)
    dm = _dm(tmp_path, val_fraction=0, batch_size=4, num_workers=num_workers, persistent_workers=True)
    dm.setup("fit")
    ds = dm.train_dataset
    assert len(ds) == 24  # 24 % 4 == 0: drop_last drops nothing
    loader = dm.train_dataloader()
    bad_in_train = {p: k for p, k in bad_paths.items() if p in {ds.path(i) for i in range(len(ds))}}
    for _ in range(2):  # two epochs (persistent workers are reused)
        seen, failed, n_batches = _epoch(loader)
        assert n_batches == 6
        assert {p for p, _ in failed} == set(bad_in_train) and len(failed) == len(bad_in_train)
        assert all(isinstance(p, str) and isinstance(r, str) and r for p, r in failed)
        assert len(seen) == 24 - len(bad_in_train)
        for idx, lab in seen:
            assert ds.labels[idx] == lab and ds.path(idx) not in bad_in_train
    reasons = dict(failed)
    for p, kind in bad_in_train.items():
        assert {"missing": "not found", "empty": "empty", "garbage": "not a recognised", "truncated": "truncated"}[
            kind
        ] in reasons[p]


def test_fully_failed_batch_is_empty_not_raised(tmp_path):
    ds = ImageDataset([f"nope{i}.jpg" for i in range(6)], list(range(6)), tmp_path, build_train_transform(16))
    for nw in (0, 2):
        loader = DataLoader(ds, batch_size=3, num_workers=nw, collate_fn=SkipFailedCollate((3, 16, 16)))
        batches = list(loader)
        assert len(batches) == 2
        for b in batches:
            assert b["image"].shape == (0, 3, 16, 16) and b["label"].shape == (0,) and b["index"].shape == (0,)
            assert len(b["failed"]) == 3 and all(split_failed(f)[1] == "file not found" for f in b["failed"])
        assert [split_failed(f)[0] for b in batches for f in b["failed"]] == [ds.path(i) for i in range(6)]
    assert SkipFailedCollate()([ds[0]])["image"].shape == (0, 3, 0, 0)


def test_val_loader_pads_to_square(gld):
    root, _ = gld
    dm = _dm(root, val_fraction=0.3, eval_image_size=40, eval_batch_size=3)
    dm.setup("fit")
    n = len(dm.val_dataset)
    assert n > 0 and n + len(dm.train_dataset) == 24
    batches = list(dm.val_dataloader())
    assert sum(b["image"].shape[0] for b in batches) == n  # no drop_last for validation
    for b in batches:
        assert b["image"].shape[1:] == (3, 40, 40)
        # source images are 24x32 -> 30x40 after resize: rows 30.. are padding
        assert torch.all(b["image"][:, :, 30:, :] == 0)
    idx = torch.cat([b["index"] for b in batches]).tolist()
    assert sorted(idx) == list(range(n))


def test_workers_get_different_augmentations(tmp_path):
    rng = np.random.default_rng(0)
    _write_jpeg(str(tmp_path / "same.jpg"), rng, size=(64, 64))
    ds = ImageDataset(
        ["same.jpg"] * 4, [0] * 4, tmp_path, build_train_transform(16, scale=(0.1, 0.5), color_jitter=0, jpeg_p=0)
    )
    loader = DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=worker_init_fn, collate_fn=SkipFailedCollate())
    out = [b["image"] for b in loader]  # worker 0: items 0, 2; worker 1: items 1, 3
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[2], out[3])
    again = [b["image"] for b in loader]  # a new epoch re-forks the workers: new draws
    assert not all(torch.equal(a, b) for a, b in zip(out, again))


def test_missing_image_dir_is_named(gld):
    root, _ = gld
    dm = _dm(root, image_dir=str(root / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="elsewhere"):
        dm.setup("fit")


def test_bad_arguments_fail_at_construction(gld):
    root, _ = gld
    with pytest.raises(ValueError, match="val_fraction"):
        _dm(root, val_fraction=1.0)
    with pytest.raises(ValueError, match="input_format"):
        _dm(root, input_format="hsv")
    with pytest.raises(ValueError, match="scale"):
        _dm(root, scale=(0.5, 0.1))


# ----------------------------------------------------------------------------- with a Trainer


class _Tiny(L.LightningModule):
    def __init__(self, num_classes):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)

    def training_step(self, batch, batch_idx):
        x = batch["image"]
        return F.cross_entropy(self.fc(x.mean((2, 3))), batch["label"]) if len(x) else self.fc.weight.sum() * 0

    def validation_step(self, batch, batch_idx):
        if len(batch["image"]):
            self.log("val_loss", F.cross_entropy(self.fc(batch["image"].mean((2, 3))), batch["label"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_load_checkpoint(self, checkpoint):  # the recommended hook: data check before weights
        dm = self.trainer.datamodule if self._trainer is not None else None
        if hasattr(dm, "check_checkpoint"):
            dm.check_checkpoint(checkpoint)


def _trainer(tmp_path, steps):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
    )


def test_trainer_fit_checkpoint_and_resume(tmp_path):
    make_gldv2(tmp_path, bad={0: "truncated"})
    dm = _dm(tmp_path, val_fraction=0.3)
    model = _Tiny(dm.num_classes)  # available before setup, as LightningCLI needs it
    trainer = _trainer(tmp_path, 2)
    trainer.fit(model, datamodule=dm)
    ckpt = str(tmp_path / "x.ckpt")
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["GLDv2DataModule"]
    assert state["landmark_ids"] == [10, 20, 30, 55] and state["num_classes"] == 4

    _trainer(tmp_path, 3).fit(_Tiny(4), datamodule=_dm(tmp_path, val_fraction=0.3), ckpt_path=ckpt)  # resumes

    other = _dm(tmp_path, val_fraction=0.3, min_images_per_class=1)  # 5 classes now
    with pytest.raises(ClassMappingError, match="checkpoint has 4 classes"):
        _trainer(tmp_path, 3).fit(_Tiny(other.num_classes), datamodule=other, ckpt_path=ckpt)

    # same class count, different landmarks: caught by the datamodule's own load_state_dict
    (tmp_path / "train2").mkdir()
    make_gldv2(tmp_path / "train2", classes={10: 6, 20: 4, 31: 2, 55: 12})
    swapped = _dm(tmp_path / "train2", val_fraction=0.3)
    model = _Tiny(4)
    model.on_load_checkpoint = lambda checkpoint: None  # without the early check
    with pytest.raises(ClassMappingError, match="first difference at label 2"):
        _trainer(tmp_path, 3).fit(model, datamodule=swapped, ckpt_path=ckpt)


def test_trainer_without_validation(tmp_path):
    make_gldv2(tmp_path)
    dm = _dm(tmp_path, val_fraction=0)
    assert dm.split_file is None and dm.val_dataloader() == []
    trainer = _trainer(tmp_path, 2)
    trainer.fit(_Tiny(dm.num_classes), datamodule=dm)
    assert trainer.global_step == 2
    assert not (tmp_path / "splits").exists()


def test_failed_entries_are_one_line_tab_separated():
    from datamodules import format_failed

    e = format_failed("/a/b\tc.jpg", "bad\nthing")
    assert e == "/a/b c.jpg\tbad thing" and split_failed(e) == ("/a/b c.jpg", "bad thing")
