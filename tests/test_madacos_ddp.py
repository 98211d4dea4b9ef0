"""MadaCos under torch.distributed: the median is taken over the global batch.

Two CPU processes (gloo) each hold part of a batch — unequal sizes included — and must
compute the same s and m as one process on the concatenated batch; their per-rank gradients
must be the single-process gradients rescaled by the local/global batch sizes.
"""
from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sg_train.losses import MadaCos

D, C, WORLD = 16, 9, 2
# (rank-0 size, rank-1 size): unequal with an even global batch (lower median), equal, and
# one where a rank holds a single sample.
SPLITS = [(3, 5), (4, 4), (6, 1)]


def _weights() -> torch.Tensor:
    return torch.randn(C, D, generator=torch.Generator().manual_seed(7))


def _scenario(i: int):
    """Embeddings near their class weight with a per-sample noise level, so that the target
    cosines spread over roughly [0.2, 0.95]: s is above its floor of 32 and m is non-zero."""
    g = torch.Generator().manual_seed(100 + i)
    n = sum(SPLITS[i])
    labels = torch.randint(0, C, (n,), generator=g)
    w = torch.nn.functional.normalize(_weights(), dim=1)
    noise = torch.rand(n, 1, generator=g) * 0.5 + 0.05
    emb = w[labels] + noise * torch.randn(n, D, generator=g)
    return emb, labels


def _state():
    loss = MadaCos(D, C, rho=0.02)
    with torch.no_grad():
        loss.weight.copy_(_weights())
    return loss.state_dict()


def _run_one(loss: MadaCos, emb: torch.Tensor, labels: torch.Tensor, train: bool):
    loss.train(train)
    x = emb.clone().requires_grad_(True)
    loss.weight.grad = None
    out = loss(x, labels)
    out.loss.backward()
    st = loss.live_stats()
    return {
        "scale": st["scale"].item(),
        "margin": st["margin"].item(),
        "median": st["median_cosine"].item(),
        "loss": out.loss.item(),
        "grad": x.grad.clone(),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    for key in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "RANK", "WORLD_SIZE"):
        os.environ.pop(key, None)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        loss = MadaCos(D, C)
        loss.load_state_dict(_state())
        results = []
        for i, split in enumerate(SPLITS):
            emb, labels = _scenario(i)
            start = sum(split[:rank])
            part = slice(start, start + split[rank])
            for train in (True, False):
                results.append(_run_one(loss, emb[part], labels[part], train))
        # gather=False: local statistics only
        local = MadaCos(D, C, gather=False)
        local.load_state_dict(_state())
        emb, labels = _scenario(0)
        start = sum(SPLITS[0][:rank])
        part = slice(start, start + SPLITS[0][rank])
        results.append(_run_one(local, emb[part], labels[part], True))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_madacos_global_median_matches_single_process(tmp_path):
    t0 = time.time()
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    single = MadaCos(D, C)
    single.load_state_dict(_state())
    k = 0
    saw_margin = False
    for i, split in enumerate(SPLITS):
        emb, labels = _scenario(i)
        n = sum(split)
        for train in (True, False):
            ref = _run_one(single, emb, labels, train)
            saw_margin |= ref["margin"] > 0
            for r in range(WORLD):
                got = per_rank[r][k]
                assert got["median"] == pytest.approx(ref["median"], abs=1e-6), (split, r)
                assert got["scale"] == pytest.approx(ref["scale"], rel=1e-6), (split, r)
                assert got["margin"] == pytest.approx(ref["margin"], abs=1e-6), (split, r)
                if not train:
                    assert got["margin"] == 0.0
                # local mean loss → rank r's rows of the gradient are (N / n_r) × the global ones
                start = sum(split[:r])
                rows = ref["grad"][start : start + split[r]]
                assert torch.allclose(got["grad"] * split[r] / n, rows, atol=1e-6), (split, r)
            # the per-rank losses average (weighted) to the global loss
            weighted = sum(per_rank[r][k]["loss"] * split[r] for r in range(WORLD)) / n
            assert weighted == pytest.approx(ref["loss"], rel=1e-5)
            k += 1
    assert saw_margin, "fixture should exercise a non-zero margin"

    # gather=False on rank r equals one process on rank r's part alone
    emb, labels = _scenario(0)
    for r in range(WORLD):
        start = sum(SPLITS[0][:r])
        part = slice(start, start + SPLITS[0][r])
        ref = _run_one(single, emb[part], labels[part], True)
        assert per_rank[r][k]["scale"] == pytest.approx(ref["scale"], rel=1e-6)
        assert per_rank[r][k]["margin"] == pytest.approx(ref["margin"], abs=1e-6)
        # ... and differs from the global statistics: the gathered test above is not vacuous
        assert abs(ref["scale"] - per_rank[r][0]["scale"]) > 1e-2
    assert time.time() - t0 < 60
