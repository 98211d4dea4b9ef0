"""Revisited-format evaluation images: crop semantics, sizes from headers, normalisation, bad input."""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sg_train.image_io import ImageReadError, read_image
from datamodules.revisited import (ImageSizeMismatchError, QueryBoxError, RevisitedDataset, fit_longest_side,
                                   read_image_size)
from sg_train.eval_protocols import get_protocol
from sg_train.retrieval import GroundTruthError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _write_png_as_jpg(path: Path, array: np.ndarray, exif_orientation: int | None = None) -> None:
    """Lossless pixels under a .jpg name (decoders go by content), so crops compare exactly."""
    im = Image.fromarray(array)
    kw = {}
    if exif_orientation is not None:
        ex = Image.Exif()
        ex[0x0112] = exif_orientation
        kw["exif"] = ex.tobytes()
    im.save(path, format="PNG", **kw)


def _make_set(root: Path, images: dict[str, np.ndarray], queries: list[tuple[str, list[float]]],
              name: str = "toy") -> Path:
    d = root / name
    (d / "jpg").mkdir(parents=True, exist_ok=True)
    for n, arr in images.items():
        _write_png_as_jpg(d / "jpg" / f"{n}.jpg", arr)
    imlist = [n for n in images if not n.startswith("q")]
    gnd = {"imlist": imlist, "qimlist": [q for q, _ in queries],
           "gnd": [{"bbx": box, "easy": np.array([0]), "hard": np.array([], np.int64), "junk": np.array([], np.int64)}
                   for _, box in queries]}
    with open(d / f"gnd_{name}.pkl", "wb") as fh:
        pickle.dump(gnd, fh)
    return d


def _pixels(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("split", ["query", "database"])
@pytest.mark.parametrize("max_size", [None, 48, 23])
def test_sizes_from_headers_equal_tensor_sizes(tiny_benchmark, split, max_size):
    ds = RevisitedDataset(tiny_benchmark, "rsynth", split, mean=MEAN, std=STD, max_size=max_size)
    sizes = ds.image_sizes()
    assert len(sizes) == len(ds) == len(ds.names)
    assert len(set(sizes)) > 1  # the benchmark mixes sizes, so bucketing is exercised
    for i in range(len(ds)):
        image, index = ds[i]
        assert index == i
        assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
        assert tuple(image.shape[1:]) == sizes[i]
        if max_size is not None:
            assert max(sizes[i]) <= max_size


def test_gnd_and_names(tiny_benchmark):
    q = RevisitedDataset(tiny_benchmark, "rsynth", "query", mean=MEAN, std=STD)
    db = RevisitedDataset(tiny_benchmark, "rsynth", "database", mean=MEAN, std=STD)
    assert q.names == q.gnd["qimlist"] and db.names == db.gnd["imlist"]
    assert all(isinstance(g["easy"], np.ndarray) for g in q.gnd["gnd"])
    assert all(Path(p).name == f"{n}.jpg" for p, n in zip(db.paths, db.names))


def test_query_crop_follows_pil_crop_with_round(tmp_path):
    """revisitop's example_process_images.py: PIL ``Image.crop(bbx)`` = int(round(v)) per coordinate."""
    img = _pixels(40, 50, 0)
    boxes = [[2.5, 3.5, 30.5, 21.4999], [0.0, 0.0, 50.0, 40.0], [10.49, 7.51, 11.5, 9.6]]
    queries = [(f"q{i}", b) for i, b in enumerate(boxes)]
    root = _make_set(tmp_path, {"q0": img, "q1": img, "q2": img, "db0": _pixels(8, 8, 1)}, queries).parent
    ds = RevisitedDataset(root, "toy", "query", mean=MEAN, std=STD)
    pil = Image.fromarray(img)
    for i, box in enumerate(boxes):
        expected = np.asarray(pil.crop(box))
        assert np.array_equal(ds.load(i), expected), box
        assert ds.image_sizes()[i] == expected.shape[:2]
    assert get_protocol("revisitop").crop_box([2.5, 3.5, 30.5, 21.4999]) == (2, 4, 30, 21)  # half to even


def test_query_crop_int_follows_superglobal(tmp_path):
    img = _pixels(40, 50, 2)
    box = [2.7, 3.5, 30.9, 21.2]
    root = _make_set(tmp_path, {"q0": img, "db0": _pixels(8, 8, 1)}, [("q0", box)]).parent
    ds = RevisitedDataset(root, "toy", "query", mean=MEAN, std=STD, protocol="superglobal")
    assert np.array_equal(ds.load(0), img[int(box[1]):int(box[3]), int(box[0]):int(box[2])])


@pytest.mark.parametrize("fmt", ["rgb", "bgr"])
def test_normalisation_in_model_channel_order(tmp_path, fmt):
    img = _pixels(12, 9, 3)
    root = _make_set(tmp_path, {"q0": img, "db0": img}, [("q0", [0, 0, 9, 12])]).parent
    mean = (0.1, 0.2, 0.3)
    std = (0.5, 0.25, 0.125)
    ds = RevisitedDataset(root, "toy", "database", mean=mean, std=std, input_format=fmt)
    x, _ = ds[0]
    pixels = img[..., ::-1] if fmt == "bgr" else img
    expected = (torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)
                - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(x, expected, atol=1e-5, rtol=1e-5)


def test_max_size_shrinks_only_and_keeps_longest_side_exact():
    assert fit_longest_side(30, 20, 64) == (30, 20)  # never enlarged
    assert fit_longest_side(768, 1024, 512) == (384, 512)
    assert fit_longest_side(1024, 700, 512) == (512, 350)
    for h in range(1, 300, 7):
        for w in range(1, 300, 11):
            fh, fw = fit_longest_side(h, w, 97)
            assert max(fh, fw) == min(97, max(h, w)) and min(fh, fw) >= 1


def test_exif_orientation_counted_in_header_sizes(tmp_path):
    d = tmp_path / "toy"
    _make_set(tmp_path, {"q0": _pixels(10, 10, 0), "db0": _pixels(8, 8, 1)}, [("q0", [0, 0, 10, 10])])
    arr = _pixels(20, 36, 4)
    buf = io.BytesIO()
    ex = Image.Exif()
    ex[0x0112] = 6  # rotate 90: decoders return 36 x 20
    Image.fromarray(arr).save(buf, format="JPEG", exif=ex.tobytes())
    (d / "jpg" / "db0.jpg").write_bytes(buf.getvalue())
    ds = RevisitedDataset(tmp_path, "toy", "database", mean=MEAN, std=STD)
    assert read_image(ds.paths[0]).shape[:2] == (36, 20)
    assert read_image_size(ds.paths[0]) == (36, 20)
    assert ds.image_sizes() == [(36, 20)] and tuple(ds[0][0].shape[1:]) == (36, 20)


# ------------------------------------------------------------------------------ bad input
def test_missing_gnd_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gnd_nothere\.pkl"):
        RevisitedDataset(tmp_path, "nothere", "query", mean=MEAN, std=STD)


def test_missing_image_names_the_file(tmp_path):
    d = _make_set(tmp_path, {"q0": _pixels(10, 10, 0), "db0": _pixels(8, 8, 1), "db1": _pixels(8, 8, 2)},
                  [("q0", [0, 0, 5, 5])])
    (d / "jpg" / "db1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images missing: .*db1\.jpg"):
        RevisitedDataset(tmp_path, "toy", "database", mean=MEAN, std=STD)


def test_bbx_outside_the_image_names_query_box_and_size(tmp_path):
    _make_set(tmp_path, {"q0": _pixels(10, 10, 0), "q1": _pixels(30, 20, 0), "db0": _pixels(8, 8, 1)},
              [("q0", [0, 0, 5, 5]), ("q1", [2.0, 3.0, 25.0, 12.0])])
    with pytest.raises(QueryBoxError, match=r"query 1 \('q1'.*25\.0.*outside the image of 20 x 30"):
        RevisitedDataset(tmp_path, "toy", "query", mean=MEAN, std=STD)


def test_negative_bbx_is_outside(tmp_path):
    _make_set(tmp_path, {"q0": _pixels(10, 10, 0), "db0": _pixels(8, 8, 1)}, [("q0", [-3.0, 0, 5, 5])])
    with pytest.raises(QueryBoxError, match="outside"):
        RevisitedDataset(tmp_path, "toy", "query", mean=MEAN, std=STD)


def test_bbx_empty_once_rounded(tmp_path):
    _make_set(tmp_path, {"q0": _pixels(10, 10, 0), "db0": _pixels(8, 8, 1)}, [("q0", [3.1, 2.0, 3.4, 8.0])])
    with pytest.raises(QueryBoxError, match=r"query 0 .*empty once rounded"):
        RevisitedDataset(tmp_path, "toy", "query", mean=MEAN, std=STD)


def test_inverted_bbx_refused_by_gnd_validation(tmp_path):
    _make_set(tmp_path, {"q0": _pixels(10, 10, 0), "db0": _pixels(8, 8, 1)}, [("q0", [6.0, 2.0, 3.0, 8.0])])
    with pytest.raises(GroundTruthError, match=r"gnd\[0\]\['bbx'\]"):
        RevisitedDataset(tmp_path, "toy", "query", mean=MEAN, std=STD)


def test_bad_split_lists_the_valid_ones(tiny_benchmark):
    with pytest.raises(ValueError, match=r"query.*database"):
        RevisitedDataset(tiny_benchmark, "rsynth", "db", mean=MEAN, std=STD)


def test_corrupt_database_image_names_the_file(tmp_path):
    d = _make_set(tmp_path, {"q0": _pixels(10, 10, 0), "db0": _pixels(8, 8, 1)}, [("q0", [0, 0, 5, 5])])
    (d / "jpg" / "db0.jpg").write_bytes(b"not an image at all")
    ds = RevisitedDataset(tmp_path, "toy", "database", mean=MEAN, std=STD)
    with pytest.raises(ImageReadError, match=r"db0\.jpg"):
        ds.image_sizes()
    with pytest.raises(ImageReadError, match=r"db0\.jpg"):
        ds[0]


def test_image_replaced_after_sizes_were_read(tmp_path):
    d = _make_set(tmp_path, {"q0": _pixels(10, 10, 0), "db0": _pixels(8, 8, 1)}, [("q0", [0, 0, 5, 5])])
    ds = RevisitedDataset(tmp_path, "toy", "database", mean=MEAN, std=STD)
    assert ds.image_sizes() == [(8, 8)]
    _write_png_as_jpg(d / "jpg" / "db0.jpg", _pixels(9, 8, 1))
    with pytest.raises(ImageSizeMismatchError, match=r"db0\.jpg.*differs"):
        ds[0]
