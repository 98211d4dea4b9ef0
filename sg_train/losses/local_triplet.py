"""CFCD stage 2: triplet loss on matched local descriptors (pure tensor functions, no state).

Source: Zhu et al., "Coarse-to-Fine: Learning Compact Discriminative Representation for
Single-Stage Image Retrieval", ICCV 2023, and its published code (github.com/bassyess/CFCD at
commit 5db8545): ``core/model/model_s2.py`` (attention), ``core/losses/super_loss.py``
(matching, nearest negatives, triplet), ``core/losses/triplet_loss.py`` (one loss per tuple,
summed over the batch). ``super_loss.py`` is NAVER's FIRe ``losses.py`` adapted to feature maps.

Notation. A tuple is an anchor image, a positive image (same landmark) and G negative images
(hard negatives). Each image gives the backbone's last feature map (C, H, W) (layer4, C = 2048
for ResNet-50); its N = H·W locations, in row-major order (index ``h·W + w``), are its local
descriptors, each L2-normalised. No projection is learnt. For a tuple::

    attention(P)_j = Σ_c |P[c, j]|                         (positive image only)
    matches        = {(i, j) : a_i and p_j mutual nearest neighbours,
                      d(p_j, 1st-nearest a) / d(p_j, 2nd-nearest a) ≤ ratio (0.9),
                      j among the ⌊N_P·top_fraction⌋ (N_P//2) most attentive positive locations}
    n_ig           = argmin_{n ∈ negative g} ‖a_i − n‖      (chosen on detached descriptors)
    loss           = Σ_{(i, j) ∈ matches} Σ_g max(0, ‖a_i − p_j‖² − ‖a_i − n_ig‖² + margin)

with d the (non-squared) Euclidean distance and margin 0.1. Every choice of index (matches,
nearest negatives, top attention) is made without gradient; the loss differentiates through
the chosen descriptors of all three images. The sum is not normalised by the number of matches
(as published).

For whoever wires this into training (not done here): the published ``triplet_loss.py`` sums
the per-tuple losses over the batch (tuples are consecutive runs of ``TUPLE_SIZE`` = 8 images:
anchor, positive, 6 negatives) and adds them to the classification loss with weight 1 — its
configs set ``LOSSES.LAMDA: 0.05`` but the value is stored and never passed on
(``SuperfeatureTripletLoss`` receives the constructor default ``superfeature_loss_weight=1.0``);
the margin likewise comes from the constructor default 0.1 (the configs' ``MARGIN`` agrees).

Every function computes in fp32 (feature maps of any floating dtype are cast first); the two loss
entries run with autocast off.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import OptionError

__all__ = [
    "LocalTripletStats",
    "check_local_triplet_options",
    "local_attention",
    "local_descriptors",
    "local_triplet_loss",
    "local_triplet_loss_batch",
    "mutual_matches",
    "nearest_negatives",
    "top_attention_mask",
    "triplet_hinge",
]

# Distances without torch.cdist's matmul shortcut (|a|² + |b|² − 2a·b, used by default above 25
# rows): the match decisions then compare exact distances, whatever the TF32 / matmul precision
# settings. The published code uses the default mode: the same numbers up to rounding.
_EXACT = "donot_use_mm_for_euclid_dist"


class LocalTripletStats(NamedTuple):
    """Counts behind a local triplet loss, int64 and detached, on the loss's device.

    0-d tensors from :func:`local_triplet_loss`, (T,) from :func:`local_triplet_loss_batch`.
    ``matches``: matched anchor–positive pairs; ``triplets``: ``matches·G``; ``active``:
    triplets whose hinge is > 0 (the ones that give a gradient). Log ``matches`` per tuple and
    ``active / triplets`` (where ``triplets`` > 0) as the fraction of active triplets.
    """

    matches: Tensor
    triplets: Tensor
    active: Tensor


# -- checks -----------------------------------------------------------------------------------

def _number(name: str, value: object) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise OptionError(f"{name} must be finite, got {value!r}")
    return x


def _check_ratio(ratio: object) -> float:
    r = _number("ratio", ratio)
    if not 0.0 < r <= 1.0:
        raise OptionError(f"ratio (Lowe's ratio test) must lie in (0, 1], got {ratio!r}")
    return r


def _check_top_fraction(top_fraction: object) -> float:
    f = _number("top_fraction", top_fraction)
    if not 0.0 < f <= 1.0:
        raise OptionError(f"top_fraction must lie in (0, 1], got {top_fraction!r}")
    return f


def _check_margin(margin: object) -> float:
    m = _number("margin", margin)
    if m < 0.0:
        raise OptionError(f"margin must be ≥ 0, got {margin!r}")
    return m


def check_local_triplet_options(options: dict[str, object] | None) -> dict[str, float]:
    """``{"margin", "ratio", "top_fraction"}`` of :func:`local_triplet_loss_batch` from ``options``
    (missing keys take the published defaults 0.1, 0.9, 0.5). Raises :class:`OptionError` naming an
    unknown key or a value out of range (margin ≥ 0; ratio and top_fraction in (0, 1])."""
    options = dict(options or {})
    unknown = sorted(set(options) - {"margin", "ratio", "top_fraction"})
    if unknown:
        raise OptionError(f"unknown local triplet option(s) {unknown}: the options are margin, ratio, top_fraction")
    return {"margin": _check_margin(options.get("margin", 0.1)), "ratio": _check_ratio(options.get("ratio", 0.9)),
            "top_fraction": _check_top_fraction(options.get("top_fraction", 0.5))}


def _check_tensor(name: str, x: object, dims: int, layout: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor of shape {layout}, got {type(x).__name__}")
    if x.dim() != dims:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _check_maps(name: str, x: object, dims: int, layout: str) -> Tensor:
    """A feature-map tensor whose last three dimensions are (C, H, W) with C, H, W ≥ 1."""
    x = _check_tensor(name, x, dims, layout)
    if min(x.shape[-3:]) < 1:
        raise ValueError(f"{name} must have C, H, W ≥ 1 in its shape {layout}, got {tuple(x.shape)}")
    return x


def _same_channels(**tensors: Tensor) -> None:
    channels = {name: t.shape[-1] for name, t in tensors.items()}
    if len(set(channels.values())) > 1:
        raise ValueError(f"descriptor dimensions (channels) differ: {channels}")


def _same_channels_maps(**maps: Tensor) -> None:
    channels = {name: m.shape[-3] for name, m in maps.items()}
    if len(set(channels.values())) > 1:
        raise ValueError(f"feature maps have different channel counts C: {channels}")


# -- descriptors and attention ---------------------------------------------------------------

def local_attention(feature_map: Tensor) -> Tensor:
    """Attention of each location: the L1 norm of its channel vector, ``Σ_c |f[b, c, h, w]|``.

    ``feature_map``: (B, C, H, W), any floating dtype. Returns fp32 (B, H·W), row-major
    locations, values ≥ 0, **detached**: the loss uses it only to choose locations (top-k), so
    no gradient flows through it (in the published code it only feeds ``topk`` indices).
    Source: CFCD code ``core/model/model_s2.py`` (``attention = f4.abs().sum(dim=1)``).
    Raises ValueError for a tensor that is not 4-D floating point with C, H, W ≥ 1.
    """
    feature_map = _check_maps("feature_map", feature_map, 4, "(B, C, H, W)")
    with torch.no_grad():
        return feature_map.detach().float().abs().sum(dim=1).flatten(1)


def local_descriptors(feature_map: Tensor) -> Tensor:
    """The local descriptors of a feature map: each location's C-vector, L2-normalised.

    ``feature_map``: (B, C, H, W), any floating dtype. Returns fp32 (B, H·W, C), location
    ``h·W + w`` in row ``h·W + w``, each row of norm 1 (an all-zero location stays zero, as with
    ``F.normalize``); differentiable. Source: CFCD code ``core/losses/triplet_loss.py``
    (``res4.flatten(start_dim=2).permute(0, 2, 1)``) and ``core/losses/super_loss.py``
    (``F.normalize(·, dim=1)`` before matching). Raises ValueError as :func:`local_attention`.
    """
    feature_map = _check_maps("feature_map", feature_map, 4, "(B, C, H, W)")
    return F.normalize(feature_map.float().flatten(2).transpose(1, 2), dim=-1)


def top_attention_mask(attention: Tensor, top_fraction: float = 0.5) -> Tensor:
    """Boolean mask (same shape) of the ``k = ⌊N·top_fraction⌋`` largest entries of each row.

    ``attention``: (..., N), floating point. ``k`` is ``N//2`` for the published 0.5
    (``attention.topk(attention.size(0)//2)`` in CFCD code ``core/losses/super_loss.py``) and
    may be 0 (then nothing is kept: one location with 0.5). Ties are broken by position, the
    lower index first (stable sort), so the mask does not depend on the device; ``topk`` leaves
    ties unspecified. Raises OptionError (a ValueError) for ``top_fraction`` outside (0, 1],
    ValueError for an ``attention`` that is not a floating-point tensor of at least one dimension.
    """
    fraction = _check_top_fraction(top_fraction)
    if not isinstance(attention, Tensor) or attention.dim() < 1 or not attention.is_floating_point():
        shape = tuple(attention.shape) if isinstance(attention, Tensor) else type(attention).__name__
        raise ValueError(f"attention must be a floating-point tensor of shape (..., N), got {shape}")
    n = attention.shape[-1]
    # The small epsilon keeps ⌊N·f⌋ from losing one to rounding (0.29·100 = 28.999…).
    k = min(n, math.floor(n * fraction + 1e-9))
    order = torch.sort(attention.detach(), dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(attention.shape, dtype=torch.bool, device=attention.device)
    return mask.scatter_(-1, order[..., :k], True)


# -- matching and negatives --------------------------------------------------------------------

def _match_mask(
    dist: Tensor, positive_attention: Tensor, ratio: float, top_fraction: float
) -> tuple[Tensor, Tensor]:
    """Batched matching on distances ``dist`` (T, N_A, N_P) between anchor and positive descriptors.

    Returns ``valid`` (T, N_P) bool — positive location j is matched — and ``nearest_anchor``
    (T, N_P) int64, the index of j's nearest anchor descriptor. Follows CFCD code
    ``core/losses/super_loss.py::match_attn`` step by step (argmin takes the first of tied
    minima, as there).
    """
    nearest_positive = dist.argmin(dim=2)  # (T, N_A): best1
    nearest_anchor = dist.argmin(dim=1)  # (T, N_P): best2
    mutual = nearest_positive.gather(1, nearest_anchor) == torch.arange(
        dist.shape[2], device=dist.device
    )
    first = dist.gather(1, nearest_anchor.unsqueeze(1)).squeeze(1)
    # Second-nearest anchor of each positive: the nearest once the first is set to +inf. With a
    # single anchor descriptor it is +inf and the ratio 0 (passes), as in the published code;
    # 0/0 (two anchors both at distance 0) is NaN and fails, as there.
    second = dist.scatter(1, nearest_anchor.unsqueeze(1), float("inf")).amin(dim=1)
    distinctive = first / second <= ratio
    attentive = top_attention_mask(positive_attention, top_fraction)
    return mutual & distinctive & attentive, nearest_anchor


def mutual_matches(
    anchor: Tensor,
    positive: Tensor,
    positive_attention: Tensor,
    *,
    ratio: float = 0.9,
    top_fraction: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Matches between the local descriptors of an anchor and a positive image.

    ``anchor``: (N_A, C), ``positive``: (N_P, C), floating point, L2-normalised (as
    :func:`local_descriptors` gives); ``positive_attention``: (N_P,) (:func:`local_attention`
    of the positive). With d the Euclidean distance (not squared), positive location j is
    matched to anchor location i when

    - i and j are mutual nearest neighbours (i = argmin_i' d(a_i', p_j) and j = argmin_j' d(a_i, p_j'));
    - the ratio test holds **for the positive**: d(p_j, nearest a) / d(p_j, second-nearest a)
      ≤ ``ratio`` (0.9);
    - j is among the ⌊N_P·``top_fraction``⌋ (N_P//2) most attentive **positive** locations
      (:func:`top_attention_mask`). The anchor's attention is not used.

    Returns ``(anchor_idx, positive_idx)``, two int64 tensors of equal length m ≥ 0, sorted by
    ``positive_idx`` (each positive and each anchor location appears at most once). Computed
    without gradient. Source: CFCD code ``core/losses/super_loss.py::match_attn``, which
    returns them in this order as ``(qindices, pindices)``.

    Raises ValueError for wrong shapes or dtypes (including N_A, N_P or C = 0) and OptionError
    (a ValueError) for ``ratio`` or ``top_fraction`` outside (0, 1].
    """
    ratio = _check_ratio(ratio)
    _check_top_fraction(top_fraction)
    anchor = _check_tensor("anchor", anchor, 2, "(N_A, C)")
    positive = _check_tensor("positive", positive, 2, "(N_P, C)")
    positive_attention = _check_tensor("positive_attention", positive_attention, 1, "(N_P,)")
    _same_channels(anchor=anchor, positive=positive)
    if min(anchor.shape) < 1 or min(positive.shape) < 1:
        raise ValueError(
            f"anchor and positive need at least one descriptor of at least one channel, "
            f"got shapes {tuple(anchor.shape)} and {tuple(positive.shape)}"
        )
    if positive_attention.shape[0] != positive.shape[0]:
        raise ValueError(
            f"positive_attention must have shape ({positive.shape[0]},) (one value per positive "
            f"descriptor), got {tuple(positive_attention.shape)}"
        )
    with torch.no_grad():
        dist = torch.cdist(anchor.detach().float()[None], positive.detach().float()[None], compute_mode=_EXACT)
        valid, nearest_anchor = _match_mask(dist, positive_attention.detach()[None], ratio, top_fraction)
        positive_idx = valid[0].nonzero().squeeze(1)
        return nearest_anchor[0, positive_idx], positive_idx


def nearest_negatives(anchors: Tensor, negatives: Tensor) -> Tensor:
    """For each anchor descriptor, its nearest descriptor in each negative image.

    ``anchors``: (m, C); ``negatives``: (G, N, C) — the descriptors of G negative images; both
    floating point (L2-normalised in the loss). Returns (m, G, C): row ``[i, g]`` is
    ``negatives[g, argmin_n ‖anchors[i] − negatives[g, n]‖]`` (first of tied minima). The index
    is chosen on detached descriptors; the returned descriptors are gathered from ``negatives``
    and keep its gradient (none flows to ``anchors``). m = 0 or G = 0 give an empty result.
    Source: CFCD code ``core/losses/super_loss.py::get_nindices`` and its ``index_select``.
    Raises ValueError for wrong shapes or dtypes (or N = 0 with m, G > 0).
    """
    anchors = _check_tensor("anchors", anchors, 2, "(m, C)")
    negatives = _check_tensor("negatives", negatives, 3, "(G, N, C)")
    _same_channels(anchors=anchors, negatives=negatives)
    g, n, c = negatives.shape
    m = anchors.shape[0]
    if m == 0 or g == 0:
        return negatives.new_zeros((m, g, c)) + 0.0 * negatives.sum()
    if n == 0:
        raise ValueError(f"negatives must have at least one descriptor per image, got shape {tuple(negatives.shape)}")
    with torch.no_grad():
        dist = torch.cdist(anchors.detach()[None], negatives.detach(), compute_mode=_EXACT)  # (G, m, N)
        index = dist.argmin(dim=2)  # (G, m)
    images = torch.arange(g, device=negatives.device).unsqueeze(1)
    return negatives[images, index].transpose(0, 1)


# -- the loss ------------------------------------------------------------------------------------

def triplet_hinge(anchors: Tensor, positives: Tensor, negatives: Tensor, margin: float = 0.1) -> Tensor:
    """Triplet hinge on squared Euclidean distances, one value per (match, negative image).

    ``anchors``, ``positives``: (m, C); ``negatives``: (m, G, C). Returns (m, G)::

        max(0, ‖a_i − p_i‖² − ‖a_i − n_ig‖² + margin)

    in the inputs' dtype, ≥ 0, differentiable in all three (``clamp(min=0)``, as published: at
    exactly 0 the gradient passes). Source: CFCD code ``core/losses/super_loss.py::triplet_loss``
    (before its sum). Raises ValueError for mismatched shapes, OptionError for ``margin`` < 0.
    """
    margin = _check_margin(margin)
    if anchors.dim() != 2 or positives.shape != anchors.shape:
        raise ValueError(
            f"anchors and positives must both have shape (m, C), got {tuple(anchors.shape)} "
            f"and {tuple(positives.shape)}"
        )
    if negatives.dim() != 3 or negatives.shape[0] != anchors.shape[0] or negatives.shape[2] != anchors.shape[1]:
        raise ValueError(
            f"negatives must have shape ({anchors.shape[0]}, G, {anchors.shape[1]}), got {tuple(negatives.shape)}"
        )
    d_pos = (anchors - positives).pow(2).sum(dim=-1)  # (m,)
    d_neg = (anchors.unsqueeze(1) - negatives).pow(2).sum(dim=-1)  # (m, G)
    return (d_pos.unsqueeze(1) - d_neg + margin).clamp(min=0.0)


def local_triplet_loss(
    anchor_map: Tensor,
    positive_map: Tensor,
    negative_maps: Tensor,
    *,
    margin: float = 0.1,
    ratio: float = 0.9,
    top_fraction: float = 0.5,
) -> tuple[Tensor, LocalTripletStats]:
    """CFCD's local triplet loss for one tuple (anchor, positive, G negatives).

    ``anchor_map``: (C, H_A, W_A); ``positive_map``: (C, H_P, W_P); ``negative_maps``:
    (G, C, H_N, W_N), G ≥ 0 — last backbone feature maps, any floating dtype, same C (the
    sizes may differ between the three roles). Composes :func:`local_descriptors`,
    :func:`local_attention` (positive), :func:`mutual_matches`, :func:`nearest_negatives` and
    :func:`triplet_hinge` (see the module docstring for the formula), and sums the hinge over
    matches × negatives (published: a sum, not a mean).

    Returns ``(loss, stats)``: ``loss`` a 0-d fp32 tensor ≥ 0; ``stats`` a
    :class:`LocalTripletStats` of 0-d tensors. With no match (or G = 0) the loss is 0.0 and still
    depends on all three maps (zero gradients), so DDP sees every parameter used; the published
    code does this with ``sum(query_feat[:1, :1])·0``. The zero term is taken over the
    normalised descriptors (bounded), not the raw maps, whose fp16 sum could overflow to inf.
    Source: CFCD code ``core/losses/super_loss.py::SuperfeatureTripletLoss.forward``.

    Raises ValueError for wrong shapes or dtypes; OptionError (a ValueError) for ``margin`` < 0
    or ``ratio``, ``top_fraction`` outside (0, 1].
    """
    _check_margin(margin)
    _check_ratio(ratio)
    _check_top_fraction(top_fraction)
    anchor_map = _check_maps("anchor_map", anchor_map, 3, "(C, H, W)")
    positive_map = _check_maps("positive_map", positive_map, 3, "(C, H, W)")
    negative_maps = _check_tensor("negative_maps", negative_maps, 4, "(G, C, H, W)")
    if min(negative_maps.shape[1:]) < 1:
        raise ValueError(f"negative_maps must have C, H, W ≥ 1 in (G, C, H, W), got {tuple(negative_maps.shape)}")
    _same_channels_maps(anchor_map=anchor_map, positive_map=positive_map, negative_maps=negative_maps)

    with torch.autocast(device_type=anchor_map.device.type, enabled=False):
        anchor = local_descriptors(anchor_map[None])[0]  # (N_A, C)
        positive = local_descriptors(positive_map[None])[0]  # (N_P, C)
        negatives = local_descriptors(negative_maps)  # (G, N_N, C)
        attention = local_attention(positive_map[None])[0]
        anchor_idx, positive_idx = mutual_matches(anchor, positive, attention, ratio=ratio, top_fraction=top_fraction)
        matched = anchor[anchor_idx]
        hinge = triplet_hinge(matched, positive[positive_idx], nearest_negatives(matched, negatives), margin)
        keep_graph = 0.0 * (anchor.sum() + positive.sum() + negatives.sum())
        loss = hinge.sum() + keep_graph

    device = loss.device
    matches = torch.tensor(anchor_idx.numel(), dtype=torch.int64, device=device)
    stats = LocalTripletStats(
        matches=matches,
        triplets=matches * negative_maps.shape[0],
        active=(hinge.detach() > 0).sum().to(torch.int64),
    )
    return loss, stats


def local_triplet_loss_batch(
    anchor_maps: Tensor,
    positive_maps: Tensor,
    negative_maps: Tensor,
    *,
    margin: float = 0.1,
    ratio: float = 0.9,
    top_fraction: float = 0.5,
) -> tuple[Tensor, LocalTripletStats]:
    """:func:`local_triplet_loss` for T tuples at once, vectorised (no loop over tuples).

    ``anchor_maps``: (T, C, H_A, W_A); ``positive_maps``: (T, C, H_P, W_P); ``negative_maps``:
    (T, G, C, H_N, W_N), any floating dtype, same C. Returns ``(losses, stats)``: ``losses``
    fp32 (T,), tuple t's value equal to ``local_triplet_loss(anchor_maps[t], positive_maps[t],
    negative_maps[t])`` up to summation order; ``stats`` a :class:`LocalTripletStats` of (T,)
    tensors. The published training loop sums ``losses`` (``core/losses/triplet_loss.py``).
    Each tuple's loss depends on its own maps even without a match (zero gradient).

    Memory: besides the descriptors, T·N_A·N_P + T·G·N_A·N_N fp32 distances (no gradient) —
    at most the size of the negatives' descriptors while N_A ≤ C (16×16 locations at 512 px vs
    C = 2048); the hinge is built for the matched locations only.

    Raises as :func:`local_triplet_loss`.
    """
    _check_margin(margin)
    ratio = _check_ratio(ratio)
    _check_top_fraction(top_fraction)
    anchor_maps = _check_maps("anchor_maps", anchor_maps, 4, "(T, C, H, W)")
    positive_maps = _check_maps("positive_maps", positive_maps, 4, "(T, C, H, W)")
    negative_maps = _check_tensor("negative_maps", negative_maps, 5, "(T, G, C, H, W)")
    if min(negative_maps.shape[2:]) < 1:
        raise ValueError(
            f"negative_maps must have C, H, W ≥ 1 in (T, G, C, H, W), got {tuple(negative_maps.shape)}"
        )
    _same_channels_maps(anchor_maps=anchor_maps, positive_maps=positive_maps, negative_maps=negative_maps)
    t = anchor_maps.shape[0]
    if positive_maps.shape[0] != t or negative_maps.shape[0] != t:
        raise ValueError(
            f"anchor_maps, positive_maps and negative_maps must hold the same number of tuples T, got "
            f"{anchor_maps.shape[0]}, {positive_maps.shape[0]} and {negative_maps.shape[0]}"
        )
    g = negative_maps.shape[1]

    with torch.autocast(device_type=anchor_maps.device.type, enabled=False):
        anchor = local_descriptors(anchor_maps)  # (T, N_A, C)
        positive = local_descriptors(positive_maps)  # (T, N_P, C)
        negatives = local_descriptors(negative_maps.flatten(0, 1)).unflatten(0, (t, g))  # (T, G, N_N, C)
        attention = local_attention(positive_maps)  # (T, N_P)
        with torch.no_grad():
            dist = torch.cdist(anchor.detach(), positive.detach(), compute_mode=_EXACT)
            valid, nearest_anchor = _match_mask(dist, attention, ratio, top_fraction)
            tuple_idx, positive_idx = valid.nonzero(as_tuple=True)  # sorted by tuple, then location
            anchor_idx = nearest_anchor[tuple_idx, positive_idx]
            if g > 0:
                neg_dist = torch.cdist(anchor.detach().unsqueeze(1), negatives.detach(), compute_mode=_EXACT)
                nearest_neg = neg_dist.argmin(dim=3)[tuple_idx, :, anchor_idx]  # (M, G)
        matched = anchor[tuple_idx, anchor_idx]  # (M, C)
        if g > 0:
            images = torch.arange(g, device=negatives.device).unsqueeze(0)
            chosen = negatives[tuple_idx.unsqueeze(1), images, nearest_neg]  # (M, G, C)
        else:
            chosen = negatives.new_zeros((matched.shape[0], 0, matched.shape[1]))
        hinge = triplet_hinge(matched, positive[tuple_idx, positive_idx], chosen, margin)  # (M, G)
        keep_graph = 0.0 * (anchor.sum(dim=(1, 2)) + positive.sum(dim=(1, 2)) + negatives.sum(dim=(1, 2, 3)))
        losses = keep_graph.index_add(0, tuple_idx, hinge.sum(dim=1))

    matches = valid.sum(dim=1)
    active = torch.zeros(t, dtype=torch.int64, device=losses.device).index_add_(
        0, tuple_idx, (hinge.detach() > 0).sum(dim=1)
    )
    return losses, LocalTripletStats(matches=matches, triplets=matches * g, active=active)
