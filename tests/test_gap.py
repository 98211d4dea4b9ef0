"""Global Average Precision (Kaggle Google Landmark Recognition metric)."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sg_train.metrics import GlobalAveragePrecision, global_average_precision

# The worked example of the metric's documentation (evaluations.kaggle_2020
# global_average_precision_score): 10 queries, two without a landmark (None), three without a
# prediction; documented value 0.5479166666.
KAGGLE_TRUE = {
    "id_001": 123, "id_002": None, "id_003": 999, "id_004": 123, "id_005": 999,
    "id_006": 888, "id_007": 666, "id_008": 666, "id_009": None, "id_010": 666,
}
KAGGLE_PRED = {
    "id_001": (123, 0.15), "id_002": (123, 0.10), "id_003": (999, 0.30), "id_005": (999, 0.40),
    "id_007": (555, 0.60), "id_008": (666, 0.70), "id_010": (666, 0.99),
}
KAGGLE_GAP = 0.5479166666


def _kaggle_vectors():
    ids = sorted(KAGGLE_TRUE)
    targets = [KAGGLE_TRUE[i] for i in ids]
    preds = [KAGGLE_PRED[i][0] if i in KAGGLE_PRED else -1 for i in ids]
    confs = [KAGGLE_PRED[i][1] if i in KAGGLE_PRED else 0.0 for i in ids]
    return preds, confs, targets


def test_kaggle_documented_example():
    # by hand: ranked 0.99 ✓, 0.70 ✓, 0.60 ✗, 0.40 ✓, 0.30 ✓, 0.15 ✓, 0.10 ✗ (no landmark)
    # Σ P(i)·rel(i) = 1 + 1 + 3/4 + 4/5 + 5/6; M = 8 queries with a landmark
    assert (1 + 1 + 3 / 4 + 4 / 5 + 5 / 6) / 8 == pytest.approx(KAGGLE_GAP, abs=1e-9)
    preds, confs, targets = _kaggle_vectors()
    metric = GlobalAveragePrecision()
    metric.update(preds, confs, targets)  # Python lists, None = no landmark
    assert metric.compute().item() == pytest.approx(KAGGLE_GAP, abs=1e-9)


def test_kaggle_example_in_batches_with_tensors():
    preds, confs, targets = _kaggle_vectors()
    t = torch.tensor([-1 if v is None else v for v in targets])
    p, c = torch.tensor(preds), torch.tensor(confs)
    metric = GlobalAveragePrecision()
    for part in (slice(0, 3), slice(3, 4), slice(4, 10)):
        metric.update(p[part], c[part], t[part])
    assert metric.compute().item() == pytest.approx(KAGGLE_GAP, abs=1e-9)
    metric.reset()
    metric.update(p.flip(0), c.flip(0), t.flip(0))  # order of queries does not matter
    assert metric.compute().item() == pytest.approx(KAGGLE_GAP, abs=1e-9)


def _slow_gap(preds, confs, targets):
    """Straight from the definition, one query at a time."""
    m = sum(1 for t in targets if t >= 0)
    ranked = sorted(
        [(c, p == t and t >= 0) for p, c, t in zip(preds, confs, targets) if p >= 0],
        key=lambda x: (-x[0], x[1]),
    )
    correct, total = 0, 0.0
    for i, (_, ok) in enumerate(ranked, start=1):
        if ok:
            correct += 1
            total += correct / i
    return total / m if m else 0.0


def test_matches_definition_on_random_data():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        n = int(torch.randint(1, 60, (1,), generator=g))
        targets = torch.randint(-1, 5, (n,), generator=g)
        preds = torch.randint(-1, 5, (n,), generator=g)
        confs = torch.rand(n, generator=g).round(decimals=1)  # plenty of ties
        got = global_average_precision(preds, confs, targets).item()
        assert got == pytest.approx(_slow_gap(preds.tolist(), confs.tolist(), targets.tolist()), abs=1e-12)


def test_ties_rank_wrong_first_independent_of_order():
    preds = torch.tensor([1, 2])
    targets = torch.tensor([1, 3])
    confs = torch.tensor([0.5, 0.5])
    a = global_average_precision(preds, confs, targets).item()
    b = global_average_precision(preds.flip(0), confs, targets.flip(0)).item()
    assert a == b == pytest.approx(0.5 / 2)  # wrong at rank 1, right at rank 2: P = 1/2; M = 2


def test_edge_cases():
    metric = GlobalAveragePrecision()
    metric.update(torch.tensor([1, 2]), torch.tensor([0.9, 0.8]), torch.tensor([-1, -1]))
    with pytest.warns(UserWarning, match="M = 0"):
        assert metric.compute().item() == 0.0
    perfect = GlobalAveragePrecision()
    perfect.update(torch.tensor([4, 5, 6]), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([4, 5, 6]))
    assert perfect.compute().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        perfect.update(torch.tensor([1, 2]), torch.tensor([0.5]), torch.tensor([1, 2]))
    assert GlobalAveragePrecision.higher_is_better and not GlobalAveragePrecision.is_differentiable
    assert set(perfect._reductions) == {"pred_labels", "confidences", "targets"}


def _shards():
    preds, confs, targets = _kaggle_vectors()
    targets = [-1 if v is None else v for v in targets]
    return [
        (torch.tensor(preds[part]), torch.tensor(confs[part]), torch.tensor(targets[part]))
        for part in (slice(0, 3), slice(3, 10))  # unequal shards
    ]


def test_states_sync_through_torchmetrics_gather():
    """In-process DDP emulation: torchmetrics' own sync path with a gather that returns this
    rank's states followed by the other rank's (the real gloo run is the slow test below)."""
    shard0, shard1 = _shards()
    other = GlobalAveragePrecision()
    other.update(*shard1)
    pending = [torch.cat(other.pred_labels), torch.cat(other.confidences), torch.cat(other.targets)]

    def fake_gather(tensor, group=None):
        return [tensor, pending.pop(0)]

    metric = GlobalAveragePrecision(dist_sync_fn=fake_gather, distributed_available_fn=lambda: True)
    metric.update(*shard0)
    assert metric.compute().item() == pytest.approx(KAGGLE_GAP, abs=1e-9)
    assert pending == []  # all three states went through the gather


def _gap_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metric = GlobalAveragePrecision()
        metric.update(*_shards()[rank])
        torch.save(metric.compute(), os.path.join(out_dir, f"gap{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~17 s on 2 cores, mostly importing torchmetrics in two fresh processes
@pytest.mark.timeout(120)
def test_syncs_across_ddp_ranks(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gap_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    for r in range(2):
        assert torch.load(tmp_path / f"gap{r}.pt").item() == pytest.approx(KAGGLE_GAP, abs=1e-9)
