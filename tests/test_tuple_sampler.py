"""datamodules.tuple_sampler.TupleBatchSampler: whole (anchor, positive, G negatives) tuples on 1 and 2 ranks."""
from __future__ import annotations

import numpy as np
import pytest

from datamodules.sampler import sample_seeds
from datamodules.tuple_sampler import TupleBatchSampler
from sg_train.errors import OptionError, UserInputError

G, T_PER_BATCH, SEED = 3, 4, 11


def make_labels() -> np.ndarray:
    """61 images: classes 10, 20, ..., 100 with 2..7 images (sparse ids, shuffled) and 3 single-image classes."""
    rng = np.random.default_rng(0)
    labels = np.concatenate([np.full(2 + c % 6, 10 * (c + 1)) for c in range(10)] + [np.array([500, 600, 700])])
    return rng.permutation(labels)


LABELS = make_labels()
ELIGIBLE = {i for i, y in enumerate(LABELS) if (LABELS == y).sum() >= 2}


def hard_classes(labels: np.ndarray) -> np.ndarray:
    """Per image: two real other classes, then the image's own class, an unknown id, -1, a repeat, a third class."""
    ids = np.unique(labels)
    own = np.searchsorted(ids, labels)

    def other(k: int) -> np.ndarray:
        return ids[(own + k) % len(ids)]

    return np.stack([other(3), other(5), labels, np.full_like(labels, 999), np.full_like(labels, -1), other(3),
                     other(7)], axis=1)


def sampler(rank=0, world=1, hard=None, **kwargs) -> TupleBatchSampler:
    options = {"tuples_per_batch": T_PER_BATCH, "negatives_per_tuple": G, "seed": SEED, "num_replicas": world,
               "rank": rank}
    return TupleBatchSampler(LABELS, hard, **{**options, **kwargs})


def tuples_of(batches: list[list[tuple[int, int]]], size: int = 2 + G) -> list[list[np.ndarray]]:
    """Each batch as its tuples (index arrays), checking that it holds whole tuples."""
    out = []
    for batch in batches:
        assert len(batch) % size == 0
        out.append(list(np.array([i for i, _ in batch]).reshape(-1, size)))
    return out


def epoch(s: TupleBatchSampler, e: int) -> list[list[tuple[int, int]]]:
    s.set_epoch(e)
    return list(s)


@pytest.mark.parametrize("world", [1, 2])
def test_every_eligible_anchor_once_over_the_ranks_in_whole_tuples_with_equal_batch_counts(world):
    samplers = [sampler(rank, world) for rank in range(world)]
    runs = [epoch(s, 3) for s in samplers]
    T = len(ELIGIBLE)
    nb = -(-T // (world * T_PER_BATCH))
    assert [len(s) for s in samplers] == [nb] * world and [len(r) for r in runs] == [nb] * world
    tuples = [t for run in runs for batch in tuples_of(run) for t in batch]
    anchors = [int(t[0]) for t in tuples]
    assert len(anchors) == len(set(anchors)) == T and set(anchors) == ELIGIBLE
    sizes = [len(batch) // (2 + G) for run in runs for batch in run]
    assert max(sizes) - min(sizes) <= 1 and max(sizes) <= T_PER_BATCH and min(sizes) >= 1
    assert samplers[0].num_tuples == T and samplers[0].tuple_size == 2 + G


def test_positives_share_the_anchor_class_and_negatives_never_do():
    for hard in (None, hard_classes(LABELS)):
        for batch in tuples_of(epoch(sampler(hard=hard), 0)):
            for t in batch:
                a, p, negatives = t[0], t[1], t[2:]
                assert p != a and LABELS[p] == LABELS[a]
                classes = LABELS[negatives]
                assert (classes != LABELS[a]).all() and len(set(classes)) == G  # G distinct other classes


def test_negatives_follow_the_hard_classes_in_order_skipping_unusable_ones_then_random():
    hard = hard_classes(LABELS)
    s = sampler(hard=hard)
    for batch in tuples_of(epoch(s, 1)):
        for t in batch:
            a = t[0]
            # usable in order: other(3), other(5), [own, 999, -1, repeat of other(3) skipped], other(7)
            np.testing.assert_array_equal(LABELS[t[2:]], hard[a, [0, 1, 6]])
    two = np.where(np.arange(7) < 2, hard, -1)  # only two hard classes: the third negative is random
    rest = []
    for batch in tuples_of(epoch(sampler(hard=two), 1)):
        for t in batch:
            np.testing.assert_array_equal(LABELS[t[2:4]], two[t[0], :2])
            rest.append(LABELS[t[4]])
    assert len(set(rest)) > 3 and s.hard_negative_fraction == 1.0
    assert sampler().hard_negative_fraction == 0.0


def test_single_image_classes_give_no_anchor_and_are_counted_but_can_be_negatives():
    s = sampler()
    assert s.single_image_classes == 3
    singles = {i for i, y in enumerate(LABELS) if y >= 500}
    seen = [int(i) for e in range(4) for batch in tuples_of(epoch(s, e)) for t in batch for i in t[2:]]
    assert not singles & {int(a) for a in s.anchors} and singles & set(seen)


def test_the_same_seed_and_epoch_give_the_same_batches_whatever_the_rank_or_history():
    a = epoch(sampler(), 5)
    fresh = sampler()
    epoch(fresh, 2)
    assert epoch(fresh, 5) == a == epoch(sampler(), 5)  # resumed at epoch 5: the same
    assert epoch(sampler(), 6) != a and epoch(sampler(seed=SEED + 1), 5) != a
    # the two ranks' shares are cut from the same global plan: rank 0's batch i, rank 1's batch i, ...
    two = [epoch(sampler(r, 2), 5) for r in range(2)]
    interleaved = [t for pair in zip(*two) for batch in pair for t in batch]
    single = sampler(tuples_per_batch=1)
    assert len(single) == len(ELIGIBLE)
    assert interleaved[0::2 + G] == [t for batch in epoch(single, 5) for t in batch][0::2 + G]


def test_a_tuple_depends_on_its_anchor_seed_and_epoch_only():
    s = sampler(hard=hard_classes(LABELS))
    anchors = np.array(sorted(ELIGIBLE))
    every = s.tuples(anchors, epoch=2)
    np.testing.assert_array_equal(s.tuples(anchors[::-1], epoch=2), every[::-1])
    np.testing.assert_array_equal(s.tuples(anchors[5:6], epoch=2), every[5:6])
    assert not np.array_equal(s.tuples(anchors, epoch=3), every)
    with pytest.raises(ValueError, match="eligible anchors only"):
        s.tuples(np.array([next(i for i, y in enumerate(LABELS) if y == 500)]))


def test_positives_vary_over_epochs_and_cover_every_other_image_of_the_class():
    s = sampler()
    anchor = next(a for a in s.anchors if (LABELS == LABELS[a]).sum() == 7)
    positives = {int(s.tuples(np.array([anchor]), epoch=e)[0, 1]) for e in range(60)}
    assert positives == {i for i, y in enumerate(LABELS) if y == LABELS[anchor] and i != anchor}


def test_batches_carry_the_epochs_augmentation_seeds_in_tuple_order():
    s = sampler()
    seeds = sample_seeds(SEED, 4, len(LABELS))
    for batch in epoch(s, 4):
        assert all(seed == int(seeds[i]) for i, seed in batch)


def test_a_dataloader_hands_the_pairs_to_the_dataset_and_lightning_sets_the_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    class Keys:  # a map-style dataset handing back the key it is asked for, as ImageDataset receives it
        def __getitem__(self, key):
            return key

    s = sampler()
    loader = DataLoader(Keys(), batch_sampler=s, collate_fn=list)
    _set_sampler_epoch(loader, 7)
    assert s.epoch == 7 and len(loader) == len(s)
    assert list(loader) == epoch(sampler(), 7)


def test_with_one_tuple_per_batch_on_two_ranks_an_odd_count_leaves_one_batch_empty():
    labels = np.array([0, 0, 1, 1, 1, 2, 3, 4])  # 5 anchors over 2 ranks, one tuple per batch
    runs = [list(TupleBatchSampler(labels, tuples_per_batch=1, negatives_per_tuple=2, num_replicas=2, rank=r))
            for r in range(2)]
    assert [len(r) for r in runs] == [3, 3]
    assert sorted(len(b) // 4 for r in runs for b in r) == [0, 1, 1, 1, 1, 1]


def test_too_few_anchors_or_classes_and_bad_options_are_refused():
    labels = np.array([0, 0, 1, 2, 3])  # two eligible anchors (the two images of class 0)
    assert len(TupleBatchSampler(labels, tuples_per_batch=2, negatives_per_tuple=2, num_replicas=2, rank=1)) == 1
    with pytest.raises(UserInputError, match=r"2 eligible anchors .*3 single-image classes.* too few for 3 processes"):
        TupleBatchSampler(labels, tuples_per_batch=2, negatives_per_tuple=2, num_replicas=3, rank=0)
    with pytest.raises(UserInputError, match=r"negatives_per_tuple=4 needs at least 5 classes.*has 4"):
        TupleBatchSampler(labels, tuples_per_batch=2, negatives_per_tuple=4)
    with pytest.raises(UserInputError, match=r"shape \(5, top_n\)"):
        TupleBatchSampler(labels, np.zeros((4, 2), np.int64), tuples_per_batch=2, negatives_per_tuple=2)
    with pytest.raises(OptionError, match="rank must be"):
        TupleBatchSampler(labels, tuples_per_batch=2, negatives_per_tuple=2, num_replicas=2, rank=2)
    with pytest.raises(OptionError, match="tuples_per_batch"):
        TupleBatchSampler(labels, tuples_per_batch=0, negatives_per_tuple=2)
    with pytest.raises(UserInputError, match="labels must be"):
        TupleBatchSampler(np.array([0, -1, 1]), tuples_per_batch=1, negatives_per_tuple=1)
