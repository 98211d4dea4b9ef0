"""CFCD stage-2 local triplet loss against hand values and a loop reference (docs/design.md §5).

Hand fixtures are 2-channel feature maps of 2×2 locations (location index ``h·2 + w``, row-major)
whose vectors are multiples of Pythagorean unit vectors, so every normalised descriptor, cosine
and squared distance ``‖u − v‖² = 2 − 2·u·v`` between unit vectors is an exact, readable number.
The matching rules are also checked on 1-channel "descriptors" on a line, where a distance is a
difference. The reference at the end re-implements the definition with Python loops over floats.
"""
from __future__ import annotations

import math

import pytest
import torch

from sg_train.errors import OptionError
from sg_train.losses.local_triplet import (
    LocalTripletStats,
    local_attention,
    local_descriptors,
    local_triplet_loss,
    local_triplet_loss_batch,
    mutual_matches,
    nearest_negatives,
    top_attention_mask,
    triplet_hinge,
)


def fmap(*vectors) -> torch.Tensor:
    """(C, 2, 2) feature map whose location h·2 + w holds ``vectors[h·2 + w]``."""
    return torch.tensor(vectors, dtype=torch.float32).T.reshape(-1, 2, 2).contiguous()


# Anchor: a0..a3 = east, north, west, south (already unit).
ANCHOR = fmap((1, 0), (0, 1), (-1, 0), (0, -1))
# Positive: unit vectors p0 = (0.8, 0.6), p1 = (−0.6, 0.8), p2 = (0, −1), p3 = (−0.6, −0.8);
# attention (|x| + |y| of the raw vectors) 14, 7, 0.5, 0.7 → top half = {p0, p1}.
POSITIVE = fmap((8, 6), (-3, 4), (0, -0.5), (-0.3, -0.4))
# Negative 0, unit: (0.6, 0.8), (0.8, −0.6), (−1, 0), (0, −1).
# Negative 1, unit: (−1, 0), (0, −1), (0.28, 0.96), (−0.6, −0.8).
NEGATIVES = torch.stack(
    [fmap((3, 4), (4, -3), (-2, 0), (0, -1)), fmap((-1, 0), (0, -5), (7, 24), (-0.6, -0.8))]
)
# A positive whose every location lies half-way between two anchor locations (45°): the nearest
# and second-nearest anchor are equally far, the ratio is 1 > 0.9, nothing matches.
POSITIVE_NO_MATCH = fmap((1, 1), (-1, 1), (-1, -1), (1, -1))


def _leaves(*tensors):
    return [t.clone().requires_grad_(True) for t in tensors]


# -- attention and descriptors -----------------------------------------------------------------

def test_local_attention_is_the_channel_l1_norm_in_row_major_order():
    feature_map = fmap((3, -4), (0, 0), (1, 2), (-0.5, 0.5))[None].requires_grad_(True)
    attention = local_attention(feature_map)
    assert attention.shape == (1, 4) and attention.dtype == torch.float32
    assert attention.tolist() == [[7.0, 0.0, 3.0, 1.0]]  # |3|+|−4|, 0, 1+2, 0.5+0.5
    assert not attention.requires_grad  # used only through top-k indices


def test_local_descriptors_are_unit_rows_in_row_major_order():
    feature_map = fmap((6, 8), (0, 0), (-5, 0), (0, 0.25))[None].half()
    descriptors = local_descriptors(feature_map)
    assert descriptors.shape == (1, 4, 2) and descriptors.dtype == torch.float32
    # (6, 8)/10, a zero location stays zero, (−5, 0)/5, (0, 0.25)/0.25
    expected = [[[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]]
    torch.testing.assert_close(descriptors, torch.tensor(expected))


def test_top_attention_mask_keeps_the_floor_fraction_and_breaks_ties_by_position():
    attention = torch.tensor([[1.0, 5.0, 3.0, 5.0, 0.0]])
    # ⌊5·0.5⌋ = 2 (= 5//2): the two 5s.
    assert top_attention_mask(attention).tolist() == [[False, True, False, True, False]]
    # ⌊5·0.2⌋ = 1: of the tied 5s, the lower index.
    assert top_attention_mask(attention, 0.2).tolist() == [[False, True, False, False, False]]
    assert top_attention_mask(attention, 1.0).all()
    # One location: ⌊1·0.5⌋ = 0, nothing kept (the published topk(N//2) does the same).
    assert not top_attention_mask(torch.tensor([3.0])).any()
    # 0.29·100 = 28.999… in floating point, still 29 locations.
    assert int(top_attention_mask(torch.arange(100.0), 0.29).sum()) == 29


# -- matching ------------------------------------------------------------------------------------

# Descriptors on a line (C = 1): anchors at 0, 1, 2, 10; positives at 0.1, 1.48, 5, 9.
#  p0 = 0.1 : nearest a0 (0.1), second a1 (0.9): ratio 0.11; a0's nearest positive is p0 → mutual.
#  p1 = 1.48: nearest a1 (0.48), second a2 (0.52): ratio 0.923 > 0.9; a1's nearest is p1 → mutual.
#  p2 = 5   : nearest a2 (3), but a2's nearest positive is p1 (0.52) → not mutual.
#  p3 = 9   : nearest a3 (1), second a2 (7): ratio 0.14; a3's nearest is p3 → mutual.
LINE_ANCHOR = torch.tensor([[0.0], [1.0], [2.0], [10.0]])
LINE_POSITIVE = torch.tensor([[0.1], [1.48], [5.0], [9.0]])


@pytest.mark.parametrize(
    "attention, ratio, top_fraction, anchor_idx, positive_idx",
    [
        # top half = {p0, p1}: p1 fails the ratio test, p3 lies outside the top half.
        ([4.0, 3.0, 2.0, 1.0], 0.9, 0.5, [0], [0]),
        # top half = {p0, p3}: p3 now matches — attention was what dropped it.
        ([1.0, 0.0, 0.0, 2.0], 0.9, 0.5, [0, 3], [0, 3]),
        # ratio 0.95 lets the mutual pair (a1, p1) through — the ratio test was what dropped it.
        ([4.0, 3.0, 2.0, 1.0], 0.95, 0.5, [0, 1], [0, 1]),
        # every location attentive, loose ratio: p2 is still dropped, being not mutual.
        ([4.0, 3.0, 2.0, 1.0], 0.95, 1.0, [0, 1, 3], [0, 1, 3]),
    ],
    ids=["ratio-and-attention-drop", "attention-keeps-p3", "loose-ratio-keeps-p1", "non-mutual-dropped"],
)
def test_mutual_matches_rules(attention, ratio, top_fraction, anchor_idx, positive_idx):
    got_a, got_p = mutual_matches(
        LINE_ANCHOR, LINE_POSITIVE, torch.tensor(attention), ratio=ratio, top_fraction=top_fraction
    )
    assert got_a.dtype == got_p.dtype == torch.int64
    assert got_a.tolist() == anchor_idx and got_p.tolist() == positive_idx


def test_ratio_test_is_on_the_positive_side():
    # Anchors 0 and 5, positives 1 and 1.05. For p0 = 1: nearest a0 (1), second a1 (4), ratio
    # 0.25 → passes. Seen from the anchor a0, its two nearest positives are 1 and 1.05 apart
    # (ratio 0.95): an anchor-side test would drop the pair. p1 is not mutual (a0 → p0).
    got = mutual_matches(torch.tensor([[0.0], [5.0]]), torch.tensor([[1.0], [1.05]]), torch.tensor([1.0, 0.0]))
    assert [t.tolist() for t in got] == [[0], [0]]


def test_single_anchor_descriptor_passes_the_ratio_test():
    # No second-nearest anchor: distance +inf, ratio 0 (as published).
    got = mutual_matches(torch.tensor([[0.0]]), torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 0.0]))
    assert [t.tolist() for t in got] == [[0], [0]]


def test_matches_of_the_hand_maps():
    # p0 → a0 (cos 0.8 vs 0.6 for a1: ratio √(0.4/0.8) = 0.71), p1 → a1 (same), both mutual and in
    # the top half. p2 = a3 exactly (mutual, ratio 0) but attention 0.5 is third of four.
    # p3 → a3 is not mutual (a3's nearest positive is p2).
    anchor = local_descriptors(ANCHOR[None])[0]
    positive = local_descriptors(POSITIVE[None])[0]
    attention = local_attention(POSITIVE[None])[0]
    torch.testing.assert_close(attention, torch.tensor([14.0, 7.0, 0.5, 0.7]))
    got = mutual_matches(anchor, positive, attention)
    assert [t.tolist() for t in got] == [[0, 1], [0, 1]]
    got = mutual_matches(anchor, positive, attention, top_fraction=1.0)
    assert [t.tolist() for t in got] == [[0, 1, 3], [0, 1, 2]]


# -- nearest negatives and the hinge ------------------------------------------------------------

def test_nearest_negatives_picks_per_image_and_keeps_only_the_negatives_gradient():
    anchors = torch.tensor([[0.0], [10.0]], requires_grad=True)
    negatives = torch.tensor([[[3.0], [-1.0], [8.0]], [[12.0], [20.0], [-5.0]]], requires_grad=True)
    chosen = nearest_negatives(anchors, negatives)
    # anchor 0: image 0 → −1 (index 1), image 1 → −5 (index 2, 5 < 12);
    # anchor 10: image 0 → 8 (index 2), image 1 → 12 (index 0).
    assert chosen.shape == (2, 2, 1)
    assert chosen.squeeze(2).tolist() == [[-1.0, -5.0], [8.0, 12.0]]
    chosen.sum().backward()
    assert anchors.grad is None  # the choice carries no gradient to the anchors
    assert negatives.grad.squeeze(2).tolist() == [[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    assert nearest_negatives(anchors[:0], negatives).shape == (0, 2, 1)
    assert nearest_negatives(anchors, negatives[:0]).shape == (2, 0, 1)


def test_triplet_hinge_values_and_gradient():
    a = torch.tensor([[1.0, 0.0]], requires_grad=True)
    p = torch.tensor([[0.8, 0.6]], requires_grad=True)
    n = torch.tensor([[[0.8, -0.6], [0.0, -1.0]]], requires_grad=True)
    hinge = triplet_hinge(a, p, n, margin=0.1)
    # ‖a − p‖² = 0.04 + 0.36 = 0.4; ‖a − n0‖² = 0.4 → 0.1; ‖a − n1‖² = 1 + 1 = 2 → max(0, −1.5) = 0.
    torch.testing.assert_close(hinge, torch.tensor([[0.1, 0.0]]))
    hinge.sum().backward()
    # Only the active triplet: ∂/∂a = 2(n0 − p), ∂/∂p = −2(a − p), ∂/∂n0 = 2(a − n0).
    torch.testing.assert_close(a.grad, torch.tensor([[0.0, -2.4]]))
    torch.testing.assert_close(p.grad, torch.tensor([[-0.4, 1.2]]))
    torch.testing.assert_close(n.grad, torch.tensor([[[0.4, 1.2], [0.0, 0.0]]]))


# -- the loss of one tuple ------------------------------------------------------------------------

def test_local_triplet_loss_of_the_hand_tuple():
    # Matches (a0, p0), (a1, p1), each ‖a − p‖² = 2 − 2·0.8 = 0.4.
    # a0 = (1, 0): nearest in negative 0 is (0.8, −0.6) (cos 0.8): 0.4 − 0.4 + 0.1 = 0.1;
    #              nearest in negative 1 is (0.28, 0.96) (cos 0.28): 0.4 − 1.44 + 0.1 < 0 → 0.
    # a1 = (0, 1): nearest in negative 0 is (0.6, 0.8) (cos 0.8): 0.1;
    #              nearest in negative 1 is (0.28, 0.96) (cos 0.96): 0.4 − 0.08 + 0.1 = 0.42.
    loss, stats = local_triplet_loss(ANCHOR, POSITIVE, NEGATIVES)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor(0.1 + 0.0 + 0.1 + 0.42))
    assert isinstance(stats, LocalTripletStats)
    assert (int(stats.matches), int(stats.triplets), int(stats.active)) == (2, 4, 3)


def test_local_triplet_loss_with_every_location_attentive():
    # top_fraction = 1 adds (a3, p2), p2 = a3 = (0, −1): ‖a − p‖² = 0, and each negative holds
    # (0, −1) too (‖a − n‖² = 0): two more hinges of 0 − 0 + 0.1.
    loss, stats = local_triplet_loss(ANCHOR, POSITIVE, NEGATIVES, top_fraction=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.62 + 0.2))
    assert (int(stats.matches), int(stats.triplets), int(stats.active)) == (3, 6, 5)
    # A larger margin makes the a0/negative-1 triplet active too: 0.4 − 1.44 + 1.1 = 0.06.
    loss, stats = local_triplet_loss(ANCHOR, POSITIVE, NEGATIVES, margin=1.1)
    torch.testing.assert_close(loss, torch.tensor(1.1 + 0.06 + 1.1 + 1.42))
    assert int(stats.active) == 4


def test_local_triplet_loss_gradients_by_hand():
    anchor, positive, negatives = _leaves(ANCHOR, POSITIVE, NEGATIVES)
    loss, _ = local_triplet_loss(anchor, positive, negatives)
    loss.backward()
    # Through x̂ = x/|x|, ∂L/∂x = (I − x̂x̂ᵀ)·g/|x| with g = ∂L/∂x̂ from the three active hinges
    # (∂/∂a = 2(n − p), ∂/∂p = −2(a − p), ∂/∂n = 2(a − n)).
    #  a0, |x| = 1: g = 2((0.8, −0.6) − (0.8, 0.6)) = (0, −2.4), already tangent.
    #  a1, |x| = 1: g = 2((0.6, 0.8) − (−0.6, 0.8)) + 2((0.28, 0.96) − (−0.6, 0.8)) = (4.16, 0.32);
    #      less its component along (0, 1): (4.16, 0).
    #  p0, |x| = 10: g = −2((1, 0) − (0.8, 0.6)) = (−0.4, 1.2); g·p̂ = 0.4 → (−0.72, 0.96)/10.
    #  p1, |x| = 5: g = 2·(−2)((0, 1) − (−0.6, 0.8)) = (−2.4, −0.8); g·p̂ = 0.8 → (−1.92, −1.44)/5.
    #  negative 0, location 1 (4, −3), |x| = 5: g = 2((1, 0) − (0.8, −0.6)) = (0.4, 1.2);
    #      g·n̂ = −0.4 → (0.72, 0.96)/5.
    #  negative 0, location 0 (3, 4), |x| = 5: g = 2((0, 1) − (0.6, 0.8)) = (−1.2, 0.4);
    #      g·n̂ = −0.4 → (−0.96, 0.72)/5.
    #  negative 1, location 2 (7, 24), |x| = 25: only a1's triplet is active:
    #      g = 2((0, 1) − (0.28, 0.96)) = (−0.56, 0.08); g·n̂ = −0.08 → (−0.5376, 0.1568)/25.
    # Every other location only took part in choices (attention, matching, nearest): zero.
    expected_anchor = fmap((0, -2.4), (4.16, 0), (0, 0), (0, 0))
    expected_positive = fmap((-0.072, 0.096), (-0.384, -0.288), (0, 0), (0, 0))
    expected_negatives = torch.stack(
        [
            fmap((-0.192, 0.144), (0.144, 0.192), (0, 0), (0, 0)),
            fmap((0, 0), (0, 0), (-0.5376 / 25, 0.1568 / 25), (0, 0)),
        ]
    )
    torch.testing.assert_close(anchor.grad, expected_anchor, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(positive.grad, expected_positive, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(negatives.grad, expected_negatives, atol=1e-6, rtol=1e-5)


def test_no_match_gives_a_zero_loss_that_still_reaches_every_map():
    anchor, positive, negatives = _leaves(ANCHOR, POSITIVE_NO_MATCH, NEGATIVES)
    loss, stats = local_triplet_loss(anchor, positive, negatives)
    assert loss.item() == 0.0 and loss.requires_grad
    assert (int(stats.matches), int(stats.triplets), int(stats.active)) == (0, 0, 0)
    loss.backward()
    for leaf in (anchor, positive, negatives):
        assert leaf.grad is not None and not leaf.grad.any()


def test_no_negative_gives_a_zero_loss():
    anchor, positive, negatives = _leaves(ANCHOR, POSITIVE, NEGATIVES[:0])
    loss, stats = local_triplet_loss(anchor, positive, negatives)
    assert loss.item() == 0.0
    assert (int(stats.matches), int(stats.triplets), int(stats.active)) == (2, 0, 0)
    loss.backward()
    assert anchor.grad is not None and not anchor.grad.any()


def test_half_precision_and_autocast_compute_in_fp32():
    expected, _ = local_triplet_loss(ANCHOR, POSITIVE, NEGATIVES)
    # The vectors the loss uses are integers, exact in bfloat16; the fractional ones (0.5, 0.3, ...)
    # only take part in choices, which bfloat16 rounding does not change here.
    loss, _ = local_triplet_loss(ANCHOR.bfloat16(), POSITIVE.bfloat16(), NEGATIVES.bfloat16())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=2e-3, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = local_triplet_loss(ANCHOR, POSITIVE, NEGATIVES)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


# -- the batched entry ---------------------------------------------------------------------------

def test_batch_of_the_hand_tuples():
    losses, stats = local_triplet_loss_batch(
        torch.stack([ANCHOR, ANCHOR]), torch.stack([POSITIVE, POSITIVE_NO_MATCH]), torch.stack([NEGATIVES, NEGATIVES])
    )
    torch.testing.assert_close(losses, torch.tensor([0.62, 0.0]))
    assert stats.matches.tolist() == [2, 0]
    assert stats.triplets.tolist() == [4, 0]
    assert stats.active.tolist() == [3, 0]


def _random_tuples(seed: int, t: int = 4, g: int = 3, c: int = 8, size: tuple[int, int] = (4, 5)):
    """ReLU maps whose positive is a shuffled, noisy copy of the anchor, so that tuples match."""
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    anchors = torch.randn(t, c, h, w, generator=gen).relu()
    flat = anchors.flatten(2)[:, :, torch.randperm(h * w, generator=gen)]
    positives = (flat.view(t, c, h, w) + 0.3 * torch.randn(t, c, h, w, generator=gen)).relu()
    negatives = torch.randn(t, g, c, h, w, generator=gen).relu()
    negatives[:, 0] = (anchors + 0.4 * torch.randn(t, c, h, w, generator=gen)).relu()  # a hard one
    return anchors, positives, negatives


@pytest.mark.parametrize("seed", [0, 1])
def test_batch_equals_the_per_tuple_calls(seed):
    anchors, positives, negatives = _leaves(*_random_tuples(seed))
    losses, stats = local_triplet_loss_batch(anchors, positives, negatives, margin=0.3)
    (losses * torch.arange(1.0, 5.0)).sum().backward()  # distinct weights: each tuple's own gradient
    batch_grads = [x.grad.clone() for x in (anchors, positives, negatives)]
    for x in (anchors, positives, negatives):
        x.grad = None
    assert int(stats.active.sum()) > 0  # the comparison covers real triplets
    for i in range(anchors.shape[0]):
        loss, one = local_triplet_loss(anchors[i], positives[i], negatives[i], margin=0.3)
        torch.testing.assert_close(losses[i], loss)
        assert [int(one.matches), int(one.triplets), int(one.active)] == [
            int(stats.matches[i]), int(stats.triplets[i]), int(stats.active[i])
        ]
        ((i + 1.0) * loss).backward()
    for got, expected in zip(batch_grads, (anchors.grad, positives.grad, negatives.grad)):
        torch.testing.assert_close(got, expected)


def test_batch_with_different_sizes_per_role_and_no_negative():
    anchors, positives, negatives = _random_tuples(3, t=2, g=2)
    positives = torch.nn.functional.interpolate(positives, size=(3, 6))
    negatives = negatives[..., :2, :3]
    losses, stats = local_triplet_loss_batch(anchors, positives, negatives)
    for i in range(2):
        loss, _ = local_triplet_loss(anchors[i], positives[i], negatives[i])
        torch.testing.assert_close(losses[i], loss)
    losses, stats = local_triplet_loss_batch(anchors, positives, negatives[:, :0])
    assert losses.tolist() == [0.0, 0.0] and stats.triplets.tolist() == [0, 0]


# -- a loop reference written from the definition ---------------------------------------------------

def _reference(anchor_map, positive_map, negative_maps, margin, ratio, top_fraction):
    """The definition with loops over Python floats: (loss, matches as (i, j) pairs, active count)."""

    def descriptors(feature_map):
        c, h, w = feature_map.shape
        values = feature_map.double().tolist()
        out = []
        for y in range(h):
            for x in range(w):
                v = [values[k][y][x] for k in range(c)]
                norm = max(math.sqrt(sum(e * e for e in v)), 1e-12)
                out.append([e / norm for e in v])
        return out

    def dist(u, v):
        return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v)))

    def argmin(values):
        return min(range(len(values)), key=lambda k: (values[k], k))

    a, p = descriptors(anchor_map), descriptors(positive_map)
    negs = [descriptors(m) for m in negative_maps]
    c, h, w = positive_map.shape
    raw = positive_map.double().tolist()
    attention = [sum(abs(raw[k][y][x]) for k in range(c)) for y in range(h) for x in range(w)]
    k_top = math.floor(len(p) * top_fraction + 1e-9)
    top = set(sorted(range(len(p)), key=lambda j: (-attention[j], j))[:k_top])

    matches = []
    for j, pj in enumerate(p):
        to_anchors = [dist(ai, pj) for ai in a]
        i = argmin(to_anchors)
        others = [d for k, d in enumerate(to_anchors) if k != i]
        second = min(others) if others else math.inf
        if second == 0.0:
            continue  # 0/0
        mutual = argmin([dist(a[i], pk) for pk in p]) == j
        if mutual and to_anchors[i] / second <= ratio and j in top:
            matches.append((i, j))

    loss, active = 0.0, 0
    for i, j in matches:
        d_pos = sum((x - y) ** 2 for x, y in zip(a[i], p[j]))
        for neg in negs:
            n = neg[argmin([dist(a[i], v) for v in neg])]
            d_neg = sum((x - y) ** 2 for x, y in zip(a[i], n))
            hinge = max(0.0, d_pos - d_neg + margin)
            loss += hinge
            active += hinge > 0
    return loss, matches, active


@pytest.mark.parametrize(
    "seed, margin, ratio, top_fraction",
    [(10, 0.1, 0.9, 0.5), (11, 0.5, 0.9, 0.5), (12, 0.3, 0.8, 0.7), (13, 1.0, 1.0, 1.0)],
)
def test_against_a_loop_reference(seed, margin, ratio, top_fraction):
    anchors, positives, negatives = _random_tuples(seed, t=3, g=3, c=6, size=(4, 4))
    losses, stats = local_triplet_loss_batch(
        anchors, positives, negatives, margin=margin, ratio=ratio, top_fraction=top_fraction
    )
    total_matches = 0
    for t in range(3):
        expected, matches, active = _reference(anchors[t], positives[t], negatives[t], margin, ratio, top_fraction)
        anchor = local_descriptors(anchors[t : t + 1])[0]
        positive = local_descriptors(positives[t : t + 1])[0]
        got = mutual_matches(
            anchor, positive, local_attention(positives[t : t + 1])[0], ratio=ratio, top_fraction=top_fraction
        )
        assert sorted(zip(*[x.tolist() for x in got]), key=lambda m: m[1]) == matches
        assert losses[t].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert int(stats.matches[t]) == len(matches) and int(stats.active[t]) == active
        assert int(stats.triplets[t]) == 3 * len(matches)
        total_matches += len(matches)
    assert total_matches > 0


# -- argument checks -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("margin", -0.1, "margin"),
        ("margin", float("nan"), "margin"),
        ("ratio", 0.0, "ratio"),
        ("ratio", 1.5, "ratio"),
        ("top_fraction", 0.0, "top_fraction"),
        ("top_fraction", 1.2, "top_fraction"),
        ("top_fraction", "half", "top_fraction"),
    ],
)
def test_bad_options_raise_naming_the_option_and_value(option, value, fragment):
    for call in (
        lambda: local_triplet_loss(ANCHOR, POSITIVE, NEGATIVES, **{option: value}),
        lambda: local_triplet_loss_batch(ANCHOR[None], POSITIVE[None], NEGATIVES[None], **{option: value}),
    ):
        with pytest.raises(OptionError) as info:
            call()
        assert fragment in str(info.value) and str(value) in str(info.value)
        assert isinstance(info.value, ValueError)
    if option != "margin":
        with pytest.raises(OptionError, match=option):
            mutual_matches(LINE_ANCHOR, LINE_POSITIVE, torch.ones(4), **{option: value})


def test_bad_shapes_raise_naming_the_argument():
    with pytest.raises(ValueError, match=r"anchor_map must have shape \(C, H, W\), got \(1, 2, 2, 2\)"):
        local_triplet_loss(ANCHOR[None], POSITIVE, NEGATIVES)
    with pytest.raises(ValueError, match="channel"):
        local_triplet_loss(ANCHOR, torch.cat([POSITIVE, POSITIVE]), NEGATIVES)
    with pytest.raises(ValueError, match="negative_maps"):
        local_triplet_loss(ANCHOR, POSITIVE, NEGATIVES[0])
    with pytest.raises(ValueError, match="floating-point"):
        local_triplet_loss(ANCHOR.long(), POSITIVE, NEGATIVES)
    with pytest.raises(ValueError, match="number of tuples"):
        local_triplet_loss_batch(ANCHOR[None], torch.stack([POSITIVE, POSITIVE]), NEGATIVES[None])
    with pytest.raises(ValueError, match=r"positive_attention must have shape \(4,\)"):
        mutual_matches(LINE_ANCHOR, LINE_POSITIVE, torch.ones(3))
    with pytest.raises(ValueError, match="feature_map"):
        local_attention(ANCHOR)
    with pytest.raises(ValueError, match="at least one descriptor"):
        mutual_matches(LINE_ANCHOR[:0], LINE_POSITIVE, torch.ones(4))
