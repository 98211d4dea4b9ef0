"""On-disk descriptor cache: hits, fp16 storage, atomic entries, corrupt files, fingerprints."""
from __future__ import annotations

import copy
import json
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.revisited import RevisitedDataset
from sg_train.descriptor_cache import CacheEntryWarning, DescriptorCache, dataset_fingerprint, model_fingerprint
from sg_train.model import EmbeddingModel


class Counter:
    def __init__(self, value: torch.Tensor):
        self.value, self.calls = value, 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        return self.value.clone()


def _descriptors(n=5, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


KEY = {"model": "abc", "data": {"name": "rsynth", "split": "query"}, "scales": [0.7071, 1.0, 1.4142]}


def test_computed_once_then_read(tmp_path):
    cache = DescriptorCache(tmp_path / "c")
    compute = Counter(_descriptors())
    a = cache.get_or_compute(KEY, compute)
    b = cache.get_or_compute(dict(reversed(list(KEY.items()))), compute)  # same key, other order
    assert compute.calls == 1
    assert torch.equal(a, compute.value) and torch.equal(b, a) and b.dtype == torch.float32
    npy, meta = cache.paths(KEY)
    assert npy.exists() and json.loads(meta.read_text())["key"] == KEY
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([npy.name, meta.name])  # no temp files
    c = cache.get_or_compute({**KEY, "scales": [1.0]}, compute)  # another key: computed again
    assert compute.calls == 2 and torch.equal(c, a)


def test_float16_storage_returns_the_same_values_on_miss_and_hit(tmp_path):
    cache = DescriptorCache(tmp_path, dtype="float16")
    compute = Counter(_descriptors(7, 16, 1))
    first = cache.get_or_compute(KEY, compute)
    second = cache.get_or_compute(KEY, compute)
    assert compute.calls == 1 and torch.equal(first, second)
    assert np.load(cache.paths(KEY)[0]).dtype == np.float16
    assert torch.equal(first, compute.value.half().float())
    # float32 and float16 entries of one key are separate
    assert not torch.equal(DescriptorCache(tmp_path).get_or_compute(KEY, compute), first)


@pytest.mark.parametrize("damage", ["flip", "truncate", "json", "swap_key", "delete_npy"])
def test_damaged_entry_is_recomputed_with_a_warning(tmp_path, damage):
    cache = DescriptorCache(tmp_path)
    compute = Counter(_descriptors())
    cache.get_or_compute(KEY, compute)
    npy, meta = cache.paths(KEY)
    if damage == "flip":
        raw = bytearray(npy.read_bytes())
        raw[-3] ^= 0x40
        npy.write_bytes(bytes(raw))
    elif damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:100])
    elif damage == "json":
        meta.write_text("{not json")
    elif damage == "swap_key":
        record = json.loads(meta.read_text())
        record["key"] = {"model": "other"}
        meta.write_text(json.dumps(record))
    else:
        npy.unlink()
    with pytest.warns(CacheEntryWarning, match=npy.name):
        out = cache.get_or_compute(KEY, compute)
    assert compute.calls == 2 and torch.equal(out, compute.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # repaired: a clean hit now
        assert torch.equal(cache.get_or_compute(KEY, compute), compute.value)
    assert compute.calls == 2


def test_failed_compute_writes_nothing(tmp_path):
    cache = DescriptorCache(tmp_path)

    def boom():
        raise RuntimeError("extraction died")

    with pytest.raises(RuntimeError, match="extraction died"):
        cache.get_or_compute(KEY, boom)
    assert list(tmp_path.iterdir()) == []


def test_bad_keys_values_and_dtype(tmp_path):
    cache = DescriptorCache(tmp_path)
    with pytest.raises(TypeError, match="JSON"):
        cache.get_or_compute({"model": object()}, lambda: _descriptors())
    with pytest.raises(ValueError, match="2-D"):
        cache.get_or_compute(KEY, lambda: torch.zeros(3))
    with pytest.raises(ValueError, match="non-finite"):
        DescriptorCache(tmp_path, dtype="float16").get_or_compute(KEY, lambda: torch.full((2, 2), 1e6))
    with pytest.raises(ValueError, match="float32.*float16"):
        DescriptorCache(tmp_path, dtype="bfloat16")


# ------------------------------------------------------------------------------ fingerprints
def test_model_fingerprint_sees_weights_buffers_settings_and_preprocessing():
    torch.manual_seed(0)
    m = EmbeddingModel("resnet18", head="rgem+gemp+sgem", embedding_dim=16)
    base = model_fingerprint(m)
    assert model_fingerprint(copy.deepcopy(m)) == base

    changed = copy.deepcopy(m)
    with torch.no_grad():
        changed.fc.weight[3, 5] += 1e-6
    assert model_fingerprint(changed) != base

    changed = copy.deepcopy(m)
    changed.backbone.bn1.running_mean[0] += 1e-3  # a buffer
    assert model_fingerprint(changed) != base

    torch.manual_seed(0)
    other_p = EmbeddingModel("resnet18", head="rgem+gemp+sgem", embedding_dim=16, gemp_p=3.0)  # no weight differs
    assert model_fingerprint(other_p) != base

    torch.manual_seed(0)
    bgr = EmbeddingModel("resnet18", head="rgem+gemp+sgem", embedding_dim=16, input_format="bgr")
    assert model_fingerprint(bgr) != base


def _toy_set(root, sizes=((10, 12), (9, 9))):
    d = root / "toy"
    (d / "jpg").mkdir(parents=True)
    names = []
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.full((h, w, 3), 40 * i, np.uint8)).save(d / "jpg" / f"db{i}.jpg")
        names.append(f"db{i}")
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(d / "jpg" / "q0.jpg")
    gnd = {"imlist": names, "qimlist": ["q0"],
           "gnd": [{"bbx": [1.0, 1.0, 15.0, 15.0], "easy": [0], "hard": [], "junk": []}]}
    with open(d / "gnd_toy.pkl", "wb") as fh:
        pickle.dump(gnd, fh)
    return d


def test_dataset_fingerprint_sees_files_split_and_preprocessing(tmp_path):
    d = _toy_set(tmp_path)
    mk = lambda split="database", **kw: RevisitedDataset(tmp_path, "toy", split, mean=None, std=None, **kw)  # noqa: E731
    base = dataset_fingerprint(mk())
    assert dataset_fingerprint(mk()) == base
    assert dataset_fingerprint(mk("query")) != base
    assert dataset_fingerprint(mk(max_size=8)) != base
    assert dataset_fingerprint(mk(input_format="bgr")) != base
    assert dataset_fingerprint(mk("query", protocol="superglobal")) != dataset_fingerprint(mk("query"))
    assert dataset_fingerprint(mk(protocol="superglobal")) != base  # same pixels, other scales and resize

    img = d / "jpg" / "db1.jpg"
    st = os.stat(img)
    Image.fromarray(np.full((9, 9, 3), 200, np.uint8)).save(img)  # same name, new pixels
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert dataset_fingerprint(mk()) != base
