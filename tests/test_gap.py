"""Global Average Precision (Kaggle Google Landmark Recognition metric), and the held-out accuracy + GAP
metric that counts each sample once under DDP."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sg_train.metrics import HeldOutClassification, global_average_precision

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


def _kaggle_rows():
    """``(indices, pred_labels, confidences, targets)`` tensors; -1 = no prediction / no landmark."""
    ids = sorted(KAGGLE_TRUE)
    targets = [-1 if KAGGLE_TRUE[i] is None else KAGGLE_TRUE[i] for i in ids]
    preds = [KAGGLE_PRED[i][0] if i in KAGGLE_PRED else -1 for i in ids]
    confs = [KAGGLE_PRED[i][1] if i in KAGGLE_PRED else 0.0 for i in ids]
    return torch.arange(len(ids)), torch.tensor(preds), torch.tensor(confs), torch.tensor(targets)


def test_kaggle_documented_example():
    # by hand: ranked 0.99 ✓, 0.70 ✓, 0.60 ✗, 0.40 ✓, 0.30 ✓, 0.15 ✓, 0.10 ✗ (no landmark)
    # Σ P(i)·rel(i) = 1 + 1 + 3/4 + 4/5 + 5/6; M = 8 queries with a landmark
    assert (1 + 1 + 3 / 4 + 4 / 5 + 5 / 6) / 8 == pytest.approx(KAGGLE_GAP, abs=1e-9)
    _, preds, confs, targets = _kaggle_rows()
    assert global_average_precision(preds, confs, targets).item() == pytest.approx(KAGGLE_GAP, abs=1e-9)
    metric = HeldOutClassification()
    metric.update(*_kaggle_rows())
    values = metric.compute()
    assert values["GAP"].item() == pytest.approx(KAGGLE_GAP, abs=1e-9)
    # accuracy over the 8 queries with a landmark: id_001, id_003, id_005, id_008, id_010 right
    assert values["acc"].item() == pytest.approx(5 / 8, abs=1e-12)


def test_held_out_metric_in_batches_and_in_any_order():
    rows = _kaggle_rows()
    metric = HeldOutClassification()
    for part in (slice(0, 3), slice(3, 4), slice(4, 10)):
        metric.update(*(t[part] for t in rows))
    metric.update(*(t[:0] for t in rows))  # a batch whose images were all unreadable
    assert metric.compute()["GAP"].item() == pytest.approx(KAGGLE_GAP, abs=1e-9)
    metric.reset()
    metric.update(*(t.flip(0) for t in rows))
    assert metric.compute()["GAP"].item() == pytest.approx(KAGGLE_GAP, abs=1e-9)


def test_held_out_metric_counts_a_repeated_index_once():
    """The DistributedSampler's padding repeats samples; their second rows must change nothing."""
    rows = _kaggle_rows()
    once = HeldOutClassification()
    once.update(*rows)
    twice = HeldOutClassification()
    twice.update(*rows)
    twice.update(*(t[[0, 7, 9]] for t in rows))  # id_001 (right), id_008 (right), id_010 (right) again
    assert {k: v.item() for k, v in twice.compute().items()} == {k: v.item() for k, v in once.compute().items()}
    plain = global_average_precision(*(torch.cat([t, t[[0, 7, 9]]]) for t in rows[1:]))
    assert plain.item() != pytest.approx(KAGGLE_GAP, abs=1e-9)  # what counting them twice would give


def test_held_out_metric_refuses_bad_input_and_warns_without_landmarks():
    metric = HeldOutClassification()
    with pytest.raises(ValueError, match="same length, got 2, 2, 1, 2"):
        metric.update(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0.5]), torch.tensor([1, 2]))
    metric.update(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0.5, 0.6]), torch.tensor([1, 2]))
    metric.update(torch.tensor([1]), torch.tensor([2]), torch.tensor([0.6]), torch.tensor([3]))
    with pytest.raises(ValueError, match="dataset index 1 arrived with targets 2 and 3"):
        metric.compute()
    no_landmark = HeldOutClassification()
    no_landmark.update(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0.9, 0.8]), torch.tensor([-1, -1]))
    with pytest.warns(UserWarning, match="no sample has a landmark"):
        assert no_landmark.compute() == {"acc": 0.0, "GAP": 0.0}
    assert HeldOutClassification.higher_is_better and not HeldOutClassification.is_differentiable
    assert set(no_landmark._reductions) == {"indices", "pred_labels", "confidences", "targets"}


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


def test_gap_edge_cases():
    assert global_average_precision(torch.tensor([1, 2]), torch.tensor([0.9, 0.8]), torch.tensor([-1, -1])).item() == 0.0
    perfect = global_average_precision(torch.tensor([4, 5, 6]), torch.tensor([0.1, 0.2, 0.3]), torch.tensor([4, 5, 6]))
    assert perfect.item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same length"):
        global_average_precision(torch.tensor([1, 2]), torch.tensor([0.5]), torch.tensor([1, 2]))


def _shards():
    """Two ranks' rows as a padded DistributedSampler hands them out: unequal shards, and
    rank 1 repeats rank 0's first sample."""
    rows = _kaggle_rows()
    return [tuple(t[0:3] for t in rows), tuple(t[[3, 4, 5, 6, 7, 8, 9, 0]] for t in rows)]


def test_states_sync_through_torchmetrics_gather():
    """In-process DDP emulation: torchmetrics' own sync path with a gather that returns this
    rank's states followed by the other rank's (the real gloo run is the slow test below)."""
    shard0, shard1 = _shards()
    other = HeldOutClassification()
    other.update(*shard1)
    pending = [torch.cat(other.indices), torch.cat(other.pred_labels), torch.cat(other.confidences), torch.cat(other.targets)]

    def fake_gather(tensor, group=None):
        return [tensor, pending.pop(0)]

    metric = HeldOutClassification(dist_sync_fn=fake_gather, distributed_available_fn=lambda: True)
    metric.update(*shard0)
    values = metric.compute()
    assert values["GAP"].item() == pytest.approx(KAGGLE_GAP, abs=1e-9)
    assert values["acc"].item() == pytest.approx(5 / 8, abs=1e-12)
    assert pending == []  # all four states went through the gather


def _gap_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        metric = HeldOutClassification()
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
        values = torch.load(tmp_path / f"gap{r}.pt")
        assert values["GAP"].item() == pytest.approx(KAGGLE_GAP, abs=1e-9)
        assert values["acc"].item() == pytest.approx(5 / 8, abs=1e-12)
