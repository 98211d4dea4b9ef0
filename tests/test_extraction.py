"""Bucketed multi-scale extraction: batched = one-by-one, deterministic plan, DDP-exact sharding."""
from __future__ import annotations

import math
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sg_train.image_io import ImageReadError
from datamodules.revisited import RevisitedDataset
from sg_train.extraction import extract_all, extract_descriptors, gather_descriptors, plan_batches
from sg_train.model import EmbeddingModel

SCALES = (1 / math.sqrt(2), 1.0, math.sqrt(2))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EmbeddingModel("resnet18", head="rgem+gemp+sgem", embedding_dim=32)


def _db(root, model, **kw):
    return RevisitedDataset(root, "rsynth", "database", mean=model.mean, std=model.std,
                            input_format=model.input_format, **kw)


# ------------------------------------------------------------------------------ plan
def test_plan_groups_equal_sizes_and_covers_every_index_once():
    rng = np.random.default_rng(0)
    choices = [(64, 48), (48, 64), (64, 64), (30, 20)]
    sizes = [choices[i] for i in rng.integers(0, len(choices), 101)]
    plan = plan_batches(sizes, 7)
    assert plan == plan_batches(list(sizes), 7)  # deterministic
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(101))
    for batch in plan:
        assert 1 <= len(batch) <= 7
        assert len({sizes[i] for i in batch}) == 1
        assert batch == sorted(batch)
    # per size only the last batch may be short
    by_size: dict = {}
    for batch in plan:
        by_size.setdefault(sizes[batch[0]], []).append(len(batch))
    for lens in by_size.values():
        assert all(n == 7 for n in lens[:-1])
    assert sizes[plan[0][0]] == (64, 64)  # largest first


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="batch_size"):
        plan_batches([(4, 4)], 0)
    with pytest.raises(ValueError, match="image 1"):
        plan_batches([(4, 4), (0, 3)], 2)


# ------------------------------------------------------------------------------ extraction
def test_batched_equals_one_by_one(tiny_benchmark, model):
    ds = _db(tiny_benchmark, model)
    assert len(set(ds.image_sizes())) > 1
    batched = extract_all(model, ds, scales=SCALES, batch_size=4, progress=False)
    model.eval()
    with torch.no_grad():
        single = torch.cat([model.extract(ds[i][0][None], SCALES) for i in range(len(ds))])
    assert batched.shape == (len(ds), 32) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(ds)))


def _run_ranks(world: int, fn):
    """Run ``fn(rank, all_gather)`` in ``world`` threads acting as ranks; ``all_gather`` behaves
    like Lightning's (every call waits for all ranks and returns the stacked tensors)."""
    barrier = threading.Barrier(world)
    slots: list = [None] * world
    local = threading.local()

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        slots[local.rank] = t.clone()
        barrier.wait()
        out = torch.stack(slots)
        barrier.wait()
        return out

    results: list = [None] * world
    errors: list = []

    def run(rank: int) -> None:
        local.rank = rank
        try:
            results[rank] = fn(rank, all_gather)
        except threading.BrokenBarrierError:
            pass  # another rank failed first
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_sharded_extraction_gathers_to_single_process_bits(tiny_benchmark, model):
    ds = _db(tiny_benchmark, model, max_size=40)
    single = extract_all(model, ds, scales=SCALES, batch_size=3, progress=False)
    shards = [extract_descriptors(model, ds, scales=SCALES, batch_size=3, shard=(r, 2), progress=False)
              for r in range(2)]
    assert sum(len(i) for i, _ in shards) == len(ds)
    assert not set(shards[0][0].tolist()) & set(shards[1][0].tolist())
    gathered = _run_ranks(2, lambda r, ag: gather_descriptors(*shards[r], len(ds), ag))
    for g in gathered:
        assert torch.equal(g, single)


def test_gather_single_process_returns_input_unchanged_semantics():
    idx = torch.tensor([2, 0, 1])
    desc = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    out = gather_descriptors(idx, desc, 3, lambda t: t)
    assert torch.equal(out, desc[[1, 2, 0]])


def test_gather_accepts_consistent_duplicates_and_refuses_others():
    desc = torch.eye(4)
    shards = [(torch.tensor([0, 1, 2]), desc[[0, 1, 2]]), (torch.tensor([3, 0]), desc[[3, 0]])]
    outs = _run_ranks(2, lambda r, ag: gather_descriptors(*shards[r], 4, ag))
    assert all(torch.equal(o, desc) for o in outs)

    bad = [(torch.tensor([0, 1, 2]), desc[[0, 1, 2]]), (torch.tensor([3, 0]), desc[[3, 1]])]
    with pytest.raises(ValueError, match=r"items \[0\] .*different descriptors"):
        _run_ranks(2, lambda r, ag: gather_descriptors(*bad[r], 4, ag))
    gap = [(torch.tensor([0, 1]), desc[[0, 1]]), (torch.tensor([3]), desc[[3]])]
    with pytest.raises(ValueError, match=r"1 of 4 items have no descriptor \(first: \[2\]\)"):
        _run_ranks(2, lambda r, ag: gather_descriptors(*gap[r], 4, ag))
    with pytest.raises(ValueError, match="out of range"):
        gather_descriptors(torch.tensor([0, 9]), desc[:2], 4, lambda t: t)


def test_more_ranks_than_batches(tiny_benchmark, model):
    ds = _db(tiny_benchmark, model, max_size=32)
    n_batches = len(plan_batches(ds.image_sizes(), 64))
    world = n_batches + 1
    shards = [extract_descriptors(model, ds, batch_size=64, shard=(r, world), progress=False) for r in range(world)]
    assert shards[-1][0].numel() == 0 and shards[-1][1].shape == (0, 32)
    outs = _run_ranks(world, lambda r, ag: gather_descriptors(*shards[r], len(ds), ag))
    assert torch.equal(outs[0], extract_all(model, ds, batch_size=64, progress=False))


def test_modes_restored_and_no_grad(tiny_benchmark, model):
    ds = _db(tiny_benchmark, model, max_size=32)
    model.train()
    model.backbone.bn1.eval()  # e.g. a frozen BatchNorm inside a training model
    before = {name: m.training for name, m in model.named_modules()}
    _, desc = extract_descriptors(model, ds, batch_size=8, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert not desc.requires_grad
    model.eval()
    extract_descriptors(model, ds, batch_size=8, progress=False)
    assert not any(m.training for m in model.modules())


def test_extraction_leaves_the_global_rng_alone(tiny_benchmark, model):
    """Training results must not depend on when (or whether) retrieval evaluation runs."""
    ds = _db(tiny_benchmark, model, max_size=32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    extract_descriptors(model, ds, batch_size=8, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_eval_mode_used_inside(tiny_benchmark):
    """Dropout active in train mode would make repeated extraction differ; eval() inside prevents it."""
    torch.manual_seed(0)
    m = EmbeddingModel("resnet18", head="gem", embedding_dim=16)
    m.head.register_forward_hook(lambda mod, inp, out: nn.functional.dropout(out, 0.5, training=mod.training))
    m.train()
    ds = _db(tiny_benchmark, m, max_size=32)
    a = extract_all(m, ds, batch_size=8, progress=False)
    b = extract_all(m, ds, batch_size=8, progress=False)
    assert torch.equal(a, b) and m.training


def test_tiny_query_crops_do_not_crash_rgem(tiny_benchmark, model):
    q = RevisitedDataset(tiny_benchmark, "rsynth", "query", mean=model.mean, std=model.std, max_size=12)
    desc = extract_all(model, q, scales=SCALES, batch_size=2, progress=False)
    assert desc.shape == (len(q), 32) and torch.isfinite(desc).all()


def test_unreadable_images_raise_or_are_reported(tiny_benchmark, model, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny_benchmark, root)
    ds = RevisitedDataset(root, "rsynth", "database", mean=model.mean, std=model.std, max_size=32)
    ds.image_sizes()
    bad = Path(ds.paths[3])
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated: the header still reads
    with pytest.raises(ImageReadError, match=bad.name):
        extract_all(model, ds, batch_size=4, progress=False)
    seen: list = []
    idx, desc = extract_descriptors(model, ds, batch_size=4, progress=False,
                                    on_unreadable=lambda i, e: seen.append((i, e.reason)))
    assert [i for i, _ in seen] == [3] and "truncated" in seen[0][1]
    assert sorted(idx.tolist()) == [i for i in range(len(ds)) if i != 3]


def test_device_mismatch_is_refused(tiny_benchmark, model):
    ds = _db(tiny_benchmark, model)
    with pytest.raises(ValueError, match="differs from the model's device"):
        extract_descriptors(model, ds, device="meta", progress=False)
