"""Revisited mAP: ``revisited_map`` (vectorised over queries and protocols) against the revisitop
loop (tests/test_retrieval_reference.py: compute_map/compute_ap as published, np.isin for numpy 2)
on ROxford-sized data: 70 queries x 4993 database images, full rankings, Easy/Medium/Hard with
mP@1,5,10, the ground truth read through ``load_gnd`` and parsed once (``GndEntries``) as evaluation
uses it; the time with the gnd dict parsed on every call is printed too.
Last line: ``ratio=<reference time / our time>`` (best of several runs each, same process).
"""
from __future__ import annotations

import argparse
import os
import pickle
import tempfile

import numpy as np
import torch
from _timing import best_time, database_chunks, query_descriptors, roxford_like, set_threads, side_by_side
from test_retrieval_reference import ref_revisited_map

from sg_train.retrieval import GndEntries, load_gnd, revisited_map, search


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nq", type=int, default=70)
    ap.add_argument("--n", type=int, default=4993)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    set_threads(args.threads)

    gnd_raw, view = roxford_like(args.nq, args.n)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "gnd_roxford_like.pkl")
        with open(path, "wb") as fh:
            pickle.dump(gnd_raw, fh)
        gnd = load_gnd(path)
    X = torch.cat(list(database_chunks(args.n, 2048, view)))
    Q = query_descriptors(args.nq, 2048)
    ranks, _ = search(Q, X, args.n)  # full rankings, positives mostly near the top
    ranks_np = ranks.numpy()
    sizes = np.array([[len(g[c]) for c in ("easy", "hard", "junk")] for g in gnd["gnd"]])
    print(f"{args.nq} queries x {args.n} images; per query easy/hard/junk on average "
          f"{sizes[:, 0].mean():.0f}/{sizes[:, 1].mean():.0f}/{sizes[:, 2].mean():.0f}")

    ours = revisited_map(ranks, gnd)
    ref = ref_revisited_map(ranks_np, gnd["gnd"])
    for p in "EMH":
        assert abs(ours[p]["mAP"] - ref[p]["mAP"]) < 1e-12, p
        assert all(abs(ours[p]["mP"][k] - v) < 1e-12 for k, v in ref[p]["mP"].items()), p
    print("mAP  E/M/H: " + " ".join(f"{100 * ours[p]['mAP']:.2f}" for p in "EMH") + "  (identical to the reference)")

    # Evaluation parses the ground truth once (GndEntries) and reuses it for every ranking, as the
    # reference reuses its parsed gnd lists; the parse itself is timed on its own below.
    entries = GndEntries.from_gnd(gnd)
    t_ref, t_ours = side_by_side("revisitop loop", lambda: ref_revisited_map(ranks_np, gnd["gnd"]),
                                 "revisited_map", lambda: revisited_map(ranks, entries),
                                 ref_repeats=5, our_repeats=50)
    t_dict, _ = best_time(lambda: revisited_map(ranks, gnd), repeats=50)
    print(f"revisited_map given the gnd dict (parses it on every call): {t_dict:.4f}s, "
          f"ratio {t_ref / t_dict:.1f}")
    print(f"ratio={t_ref / t_ours:.1f}")


if __name__ == "__main__":
    main()
