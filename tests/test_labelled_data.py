"""Your own photos as they are: class folders and OML-style CSVs, the held-out split, the benchmark."""
from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datamodules.image_dataset import ImageDataset
from datamodules.labelled import LabelledImagesDataModule
from datamodules.labelled_index import (
    LabelledDataError,
    _class_order,
    _sort_key,
    held_out_count,
    held_out_mask,
    read_class_folders,
    read_labelled_csv,
)
from sg_train.errors import OptionError, is_user_error


def photo(path: Path, seed: int = 0, size=(40, 30), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG"))
    return path


def folder(root: Path, classes: dict[str, int], ext=(".jpg", ".JPG", ".png", ".jpeg")) -> Path:
    for c, (name, n) in enumerate(classes.items()):
        for k in range(n):
            photo(root / name / f"IMG_{k:04d}{ext[k % len(ext)]}", seed=100 * c + k)
    return root


def test_class_folders_as_people_have_them(tmp_path):
    root = folder(tmp_path / "My Photos", {"Église Saint-Étienne": 5, "Café de Flore": 4, "Big Ben": 3})
    photo(root / "Big Ben" / "2019 trip" / "nested.webp", fmt="WEBP")  # nested folders belong to the class
    (root / "Big Ben" / "notes.txt").write_text("not a photo")
    (root / "Big Ben" / ".DS_Store").write_bytes(b"\0")
    (root / "Empty").mkdir()
    photo(root / "stray.jpg")
    data = read_class_folders(root)
    assert data.class_names == ["Big Ben", "Café de Flore", "Église Saint-Étienne"]
    assert np.bincount(data.labels).tolist() == [4, 4, 5]
    assert "Big Ben/2019 trip/nested.webp" in data.paths and "Café de Flore/IMG_0002.png" in data.paths
    assert data.skipped == {"files outside a class folder": ["stray.jpg"], "not image files": ["Big Ben/notes.txt"],
                            "class folders without images": ["Empty"]}
    assert all(Path(data.path(i)).is_file() for i in range(len(data)))


def test_decomposed_accents_are_one_name_and_colliding_names_are_refused(tmp_path):
    nfd = unicodedata.normalize("NFD", "Café")
    root = folder(tmp_path / "a", {nfd: 2, "Tower": 2})
    assert read_class_folders(root).class_names == ["Café", "Tower"]  # NFC, as typed on another system
    folder(root, {"café": 2})
    with pytest.raises(LabelledDataError, match=f"'{nfd}' and 'café' are the same name"):
        read_class_folders(root)


@pytest.mark.parametrize("layout, message", [
    ({"Only": 3}, "one class 'Only'; classification training needs at least two classes"),
    ({}, "no class folder holds an image"),
])
def test_data_that_cannot_train_is_refused(tmp_path, layout, message):
    root = folder(tmp_path / "p", layout)
    root.mkdir(exist_ok=True)
    with pytest.raises(LabelledDataError, match=message):
        read_class_folders(root)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_class_folders(tmp_path / "nowhere")


def test_held_out_rule_keeps_two_per_class_for_leave_one_out():
    assert [held_out_count(n, 0.2) for n in (1, 2, 3, 4, 5, 10, 20, 100)] == [0, 1, 1, 2, 2, 2, 4, 20]
    assert held_out_count(6, 0.9) == 3  # never more than half


def test_held_out_split_is_seeded_order_free_and_stable_when_a_class_grows(tmp_path):
    root = folder(tmp_path / "p", {"A": 10, "B": 10, "C": 1})
    data = read_class_folders(root)
    mask = held_out_mask(data, 0.2, seed=0)
    assert mask.sum() == 4 and not mask[data.labels == 2].any()  # C: its only image is trained on
    assert not np.array_equal(mask, held_out_mask(data, 0.2, seed=1))
    folder(root, {"A": 14})  # four more photos of A
    grown = read_class_folders(root)
    b_before = [p for p, m in zip(data.paths, mask) if m and p.startswith("B/")]
    b_after = [p for p, m in zip(grown.paths, held_out_mask(grown, 0.2, seed=0)) if m and p.startswith("B/")]
    assert b_before == b_after


def test_the_split_is_written_once_reused_and_never_overwritten(tmp_path):
    root = folder(tmp_path / "p", {"A": 6, "B": 6})
    first = LabelledImagesDataModule(images=str(root), num_workers=0)
    held = first.held_out
    split_file = Path(first.split_file)
    assert split_file.parent == root / ".sg-train" and split_file.is_file()
    stored = json.loads(split_file.read_text())
    assert stored["held_out"] == [p for p, m in zip(first.data.paths, held) if m]
    assert read_class_folders(root).class_names == ["A", "B"]  # .sg-train is not a class
    again = LabelledImagesDataModule(images=str(root), num_workers=0)
    assert np.array_equal(again.held_out, held) and again.split_file == first.split_file
    other = LabelledImagesDataModule(images=str(root), num_workers=0, split_file=str(split_file), val_fraction=0.3)
    with pytest.raises(LabelledDataError, match="holds fraction 0.2, seed 0; this run asks for 0.3, 0"):
        other.held_out
    folder(root, {"C": 4})
    changed = LabelledImagesDataModule(images=str(root), num_workers=0, split_file=str(split_file))
    with pytest.raises(LabelledDataError, match="written for other data"):
        changed.held_out
    assert json.loads(split_file.read_text()) == stored


def test_an_unwritable_split_location_names_the_option(tmp_path):
    root = folder(tmp_path / "p", {"A": 4, "B": 4})
    (tmp_path / "blocked").write_text("a file, not a folder")
    dm = LabelledImagesDataModule(images=str(root), num_workers=0, split_file=str(tmp_path / "blocked" / "s.json"))
    with pytest.raises(LabelledDataError, match="set data.split_file to a writable path"):
        dm.held_out


def write_csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_oml_csv_with_split_roles_and_boxes(tmp_path):
    for k in range(6):
        photo(tmp_path / "img" / f"{k}.jpg", seed=k, size=(60, 50))
    csv = write_csv(tmp_path / "df.csv", "label,path,split,is_query,is_gallery,x_1,x_2,y_1,y_2,category", [
        "7,img/0.jpg,train,,,,,,,", "7,img/1.jpg,validation,1,1,5,45,10,40,church",
        "7,img/2.jpg,validation,0,1,,,,,", "12,img/3.jpg,train,,,,,,,",
        "12,img/4.jpg,validation,1,0,0,60,0,50,", "12,img/5.jpg,validation,0,1,,,,,"])
    data = read_labelled_csv(csv)
    assert data.class_names == ["7", "12"]  # integer labels sorted as numbers
    assert data.split.tolist() == [False, True, True, False, True, True]
    np.testing.assert_array_equal(data.boxes[1], [5, 10, 45, 40])
    dm = LabelledImagesDataModule(csv=str(csv), num_workers=0, batch_size=2)
    bench = dm.retrieval_benchmark(mean=dm.mean, std=dm.std, input_format="rgb", protocol="revisitop")
    assert [Path(p).name for p in bench.queries.paths] == ["1.jpg", "4.jpg"]
    assert [Path(p).name for p in bench.gallery.paths] == ["1.jpg", "2.jpg", "5.jpg"]
    assert bench.query_gallery_ids.tolist() == [0, -1]
    assert bench.queries.image_sizes() == [(30, 40), (50, 60)]  # cropped to the box
    train = ImageDataset([data.paths[i] for i in (0, 1)], data.labels[:2], data.root, boxes=data.boxes[:2])
    assert tuple(train[0]["image"].shape) == (3, 50, 60) and tuple(train[1]["image"].shape) == (3, 30, 40)
    outside = ImageDataset([data.paths[1]], data.labels[:1], data.root, boxes=[[0, 0, 99, 10]])
    assert outside[0]["image"] is None and "does not fit the image (60 x 50 W x H)" in outside[0]["failed"][1]


@pytest.mark.parametrize("header, rows, message", [
    ("path,label,colour", ["a.jpg,1,red"], r"unknown columns \['colour'\]"),
    ("path", ["a.jpg"], r"missing columns \['label'\]"),
    ("path,label", ["a.jpg,1", "./a.jpg,2"], "listed more than once: line 2 'a.jpg', line 3 './a.jpg'"),
    ("path,label", ["a.jpg,1", "gone.jpg,2"], r"1 of 2 images do not exist: line 3 '.*/gone.jpg'; relative paths start from data.image_root"),
    ("path,label", ["a.jpg,Paris", "b.jpg,paris"], "'Paris' and 'paris' are the same name"),
    ("path,label,split", ["a.jpg,1,train", "b.jpg,2,test"], "line 3: split='test'; write train or validation"),
    ("path,label,split,is_query", ["a.jpg,1,train"], "is_query and is_gallery go together"),
    ("path,label,x_1,y_1,x_2,y_2", ["a.jpg,1,5,5,2,9", "b.jpg,2,,,,"], r"line 2: box \[5.0, 5.0, 2.0, 9.0\]"),
    ("path,label", ["a.jpg,", "b.jpg,2"], "line 2: empty label"),
    ("path,label", ["a.jpg,1", "b.jpg,01"], r"'1' and '01' are the same number 1; merge them under one spelling "
                                            r"\(e.g. '1'\)"),
    ("path,label", ["a.jpg,+1", "b.jpg,1"], "'\\+1' and '1' are the same number 1"),
    ("path,label", ["a.jpg,1", "b.jpg,1.0"], "'1' and '1.0' are the same number 1"),
    ("path,label", ["sub\\a.jpg,1", "b.jpg,2"], r"1 of 2 images do not exist: line 2 .*; these paths are "
                                                 r"written with \\, which is not a folder separator here: write "
                                                 r"them with / \(e.g. 'sub/a.jpg'\)$"),
    ("path,label", ["a.jpg,1", "sub,2"], r"1 of 2 paths are folders, not image files: line 3 '.*/sub'; list each "
                                         r"image file on its own row"),
    ("path;label", ["a.jpg;1"], "header 'path;label' is separated by ';', not by commas; save the file "
                                "comma-separated"),
    ("path\tlabel", ["a.jpg\t1", "b.jpg,x\t2"], r"header 'path\\tlabel' is separated by tabs, not by commas"),
])
def test_csv_mistakes_name_the_line_or_column(tmp_path, header, rows, message):
    photo(tmp_path / "a.jpg")
    photo(tmp_path / "b.jpg", seed=1)
    photo(tmp_path / "sub" / "a.jpg", seed=2)
    csv = write_csv(tmp_path / "data.csv", header, rows)
    with pytest.raises(LabelledDataError, match=message) as caught:
        read_labelled_csv(csv)
    assert is_user_error(caught.value)


def test_the_same_image_by_another_path_is_listed_once(tmp_path):
    photo(tmp_path / "photos" / "a.jpg")
    photo(tmp_path / "photos" / "b.jpg", seed=1)
    (tmp_path / "imgs").symlink_to(tmp_path / "photos")
    absolute = tmp_path / "imgs" / "a.jpg"
    csv = write_csv(tmp_path / "data.csv", "path,label", ["imgs/a.jpg,1", "imgs/b.jpg,2", f"{absolute},2"])
    with pytest.raises(LabelledDataError, match=f"listed more than once: line 2 'imgs/a.jpg', line 4 '{absolute}' "
                                                f"\\(both are '{tmp_path}/photos/a.jpg'\\)"):
        read_labelled_csv(csv)
    write_csv(csv, "path,label", ["imgs/a.jpg,1", "imgs/b.jpg,2", "photos/a.jpg,2"])  # through the symlink
    with pytest.raises(LabelledDataError, match="line 2 'imgs/a.jpg', line 4 'photos/a.jpg'"):
        read_labelled_csv(csv)


def test_integer_labels_written_as_floats_are_integers(tmp_path):
    for k in range(3):
        photo(tmp_path / f"{k}.jpg", seed=k)
    csv = write_csv(tmp_path / "data.csv", "path,label", ["0.jpg,12.0", "1.jpg,7.0", "2.jpg,7.0"])  # pandas with NaN
    assert read_labelled_csv(csv).class_names == ["7", "12"]
    write_csv(csv, "path,label", ["0.jpg,12.0", "1.jpg,7.0", "2.jpg,+12.0"])
    with pytest.raises(LabelledDataError, match=r"labels '12.0' and '\+12.0' are the same number 12"):
        read_labelled_csv(csv)


def test_class_order_does_not_depend_on_the_order_names_come_in():
    names = ["1", "01", "+1", "-1", "10", "Paris", "paris", "2"]
    assert len({_sort_key(n) for n in names}) == len(names)  # a total order: no ties left to set iteration
    assert _class_order(names) == _class_order(names[::-1]) == ["-1", "+1", "01", "1", "2", "10", "Paris", "paris"]
    assert _class_order(["2", "+-1", "²"]) == ["2", "+-1", "²"]  # look like numbers, are text


def test_options_that_cannot_work_are_refused_at_construction(tmp_path):
    with pytest.raises(OptionError, match="give data.images .* or data.csv .*, not neither"):
        LabelledImagesDataModule()
    with pytest.raises(OptionError, match="not both"):
        LabelledImagesDataModule(images="a", csv="b.csv")
    with pytest.raises(OptionError, match="image_root goes with data.csv"):
        LabelledImagesDataModule(images="a", image_root="b")


def test_too_few_photos_for_one_batch_is_said_before_training(tmp_path):
    root = folder(tmp_path / "p", {"A": 4, "B": 4})
    dm = LabelledImagesDataModule(images=str(root), num_workers=0, batch_size=32)
    with pytest.raises(ValueError, match="4 training images are fewer than one batch of data.batch_size=32; set "
                                         "data.batch_size to at most 4"):
        dm.setup("fit")


def test_datamodule_classes_come_from_the_data(tmp_path):
    root = folder(tmp_path / "p", {"B": 5, "A": 4, "C": 1})
    dm = LabelledImagesDataModule(images=str(root), num_workers=0, batch_size=2, image_size=32)
    assert dm.class_names == ["A", "B", "C"] and dm.num_classes == 3
    assert dm.class_counts.tolist() == [2, 3, 1]  # held out: 2 of A (4 images), 2 of B (5), none of C
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    state = dm.state_dict()
    renamed = folder(tmp_path / "q", {"B": 5, "A2": 4, "C": 1})
    other = LabelledImagesDataModule(images=str(renamed), num_workers=0)
    with pytest.raises(ValueError, match="first difference at class 0: checkpoint 'A', data 'A2'.*model.init_from"):
        other.load_state_dict(state)


def test_files_that_are_no_images_are_skipped_when_the_data_is_read_not_during_an_epoch(tmp_path):
    root = folder(tmp_path / "p", {"A": 4, "B": 4, "C": 1})
    (root / "A" / "notes.jpg").write_text("not a photo")
    (root / "B" / "IMG_9999.JPG").write_bytes((root / "B" / "IMG_0000.jpg").read_bytes()[:40])  # cut in its header
    (root / "C" / "IMG_0000.jpg").write_bytes(b"")  # C's only photo
    dm = LabelledImagesDataModule(images=str(root), num_workers=0, batch_size=2)
    assert dm.class_names == ["A", "B"] and len(dm.data) == 8
    skipped = dm.data.skipped
    assert [line.split(":")[0] for line in skipped["unreadable images"]] == ["A/notes.jpg", "B/IMG_9999.JPG",
                                                                          "C/IMG_0000.jpg"]
    assert skipped["classes without a readable image"] == ["C"]
    assert dm.data.sizes.tolist() == [[30, 40]] * 8


def test_a_training_box_outside_its_image_stops_before_the_first_step(tmp_path):
    for k in range(4):
        photo(tmp_path / f"{k}.jpg", seed=k, size=(60, 50))
    csv = write_csv(tmp_path / "df.csv", "path,label,split,x_1,y_1,x_2,y_2", [
        "0.jpg,a,train,10,10,5000,5000", "1.jpg,a,validation,,,,", "2.jpg,b,train,,,,", "3.jpg,b,validation,,,,"])
    with pytest.raises(LabelledDataError, match=r"box \[10.0, 10.0, 5000.0, 5000.0\] of '0.jpg' does not fit the image "
                                                r"\(60 x 50 W x H\)"):
        LabelledImagesDataModule(csv=str(csv), num_workers=0).data


def test_resuming_with_other_held_out_photos_is_refused(tmp_path):
    root = folder(tmp_path / "p", {"A": 6, "B": 6})
    state = LabelledImagesDataModule(images=str(root), num_workers=0).state_dict()
    same = LabelledImagesDataModule(images=str(root), num_workers=0)
    same.load_state_dict(state)  # nothing changed: fine
    held = next(p for p, m in zip(same.data.paths, same.held_out) if m)
    (root / held).unlink()  # a held-out photo deleted: the split is drawn again
    moved = LabelledImagesDataModule(images=str(root), num_workers=0)
    with pytest.raises(LabelledDataError, match="the held-out photos differ from the checkpoint's.*model.init_from"):
        moved.check_checkpoint({"LabelledImagesDataModule": state})


def test_a_class_with_every_photo_held_out_cannot_train(tmp_path):
    for k in range(4):
        photo(tmp_path / f"{k}.jpg", seed=k)
    csv = write_csv(tmp_path / "df.csv", "path,label,split", ["0.jpg,a,validation", "1.jpg,a,validation",
                                                              "2.jpg,b,train", "3.jpg,b,validation"])
    dm = LabelledImagesDataModule(csv=str(csv), num_workers=0, batch_size=1)
    assert dm.held_out.tolist() == [True, True, False, True]  # the split itself is fine (a benchmark can use it)
    with pytest.raises(LabelledDataError, match=r"classes \['a'\] have no training image"):
        dm.class_counts
    with pytest.raises(LabelledDataError, match=r"classes \['a'\] have no training image"):
        dm.setup("fit")
