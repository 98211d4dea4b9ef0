"""Multi-scale descriptor extraction over evaluation datasets, bucketed by image size.

Images of one exact size are batched together (no padding, no resizing to a common size), so
a batched descriptor equals the one-by-one descriptor up to float summation order. The batch
plan depends only on the sizes and the batch size; under DDP every rank builds the same plan
and takes whole batches ``plan[rank::world]``, so every image is computed inside the very same
batch as in a single process and the gathered result equals single-process bit for bit.

Datasets: anything with ``__len__``, ``__getitem__(i) -> (image (3, H, W), i)`` and
``image_sizes() -> [(H, W)]`` (e.g. :class:`datamodules.revisited.RevisitedDataset`,
:class:`datamodules.r1m.R1MDataset`), optionally ``protocol`` (the
:class:`~sg_train.eval_protocols.EvalProtocol` it was made for), or a wrapper whose ``dataset``
attribute is such a dataset (torch's ``Subset``, the R1M chunks of
:func:`sg_train.r1m_extraction.extract_r1m`).

The evaluation protocol decides the scales and how each is resized (:class:`ProtocolModel`):
it comes from the ``protocol`` argument, a model bound with :func:`bind_protocol`, or the
dataset, and where more than one is given they must agree. Without any, the model's own
``extract(images, scales)`` runs (its default scales and resize).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from sg_train.eval_protocols import EvalProtocol, ProtocolError, get_protocol
from sg_train.image_io import ImageReadError
from sg_train.progress import progress_bar

__all__ = ["ProtocolModel", "bind_protocol", "extract_all", "extract_descriptors", "gather_descriptors",
           "plan_batches"]


class ProtocolModel(nn.Module):
    """A model that extracts multi-scale descriptors the way an evaluation protocol says.

    ``extract(images, scales=None)``: ``EmbeddingModel.extract`` at the protocol's scales (None) or
    the ones given, each resized by :meth:`EvalProtocol.resize
    <sg_train.eval_protocols.EvalProtocol.resize>` instead of the model's default (bilinear with
    antialias, which SuperGlobal's published code does not use); ``(B, D)`` float, L2-normalised.

    Parameters, buffers, ``embedding_dim``, ``preprocessing``, ``input_format``, ``mean`` and
    ``std`` are the wrapped model's; ``scales`` are the protocol's; ``repr`` names the protocol
    with every setting, so :func:`sg_train.descriptor_cache.model_fingerprint` tells protocols apart.

    Raises :class:`~sg_train.eval_protocols.ProtocolError` when the protocol fixes colours that the
    model's ``input_format``/``mean``/``std`` contradict.
    """

    def __init__(self, model: nn.Module, protocol: str | EvalProtocol) -> None:
        super().__init__()
        protocol = get_protocol(protocol)
        protocol.check_colours(model.input_format, model.mean, model.std, what=f"the model ({type(model).__name__})")
        self.model = model
        self.protocol = protocol

    @property
    def embedding_dim(self) -> int:
        return int(self.model.embedding_dim)

    @property
    def preprocessing(self) -> Any:
        return self.model.preprocessing

    @property
    def input_format(self) -> str:
        return self.model.input_format

    @property
    def mean(self) -> tuple[float, ...]:
        return self.model.mean

    @property
    def std(self) -> tuple[float, ...]:
        return self.model.std

    @property
    def scales(self) -> tuple[float, ...]:
        return self.protocol.scales

    def extract(self, images: Tensor, scales: Sequence[float] | None = None) -> Tensor:
        return self.model.extract(images, self.protocol.scales if scales is None else scales, resize=self.protocol.resize)

    def extra_repr(self) -> str:
        return "protocol=" + json.dumps(self.protocol.describe(), sort_keys=True)


def bind_protocol(model: nn.Module, protocol: str | EvalProtocol) -> ProtocolModel:
    """``model`` extracting under ``protocol`` (a bound model is re-bound to the protocol given).

    For code that hands a model to something that calls ``model.extract`` itself (e.g.
    :func:`sg_train.r1m_extraction.extract_r1m`, whose R1M items carry no protocol).
    """
    inner = model.model if isinstance(model, ProtocolModel) else model
    protocol = get_protocol(protocol)
    if isinstance(model, ProtocolModel) and model.protocol == protocol:
        return model
    return ProtocolModel(inner, protocol)


def _resolve_protocol(model: nn.Module, dataset: Any, protocol: str | EvalProtocol | None) -> EvalProtocol | None:
    """The one protocol among the argument, a bound model's and the dataset's; ProtocolError if they differ."""
    found: dict[str, EvalProtocol] = {}
    if protocol is not None:
        found["the protocol argument"] = get_protocol(protocol)
    if isinstance(model, ProtocolModel):
        found["the model"] = model.protocol
    source = dataset
    while source is not None and getattr(source, "protocol", None) is None:
        source = getattr(source, "dataset", None)  # a wrapper: the protocol of what it wraps
    if source is not None:
        found[f"dataset {getattr(source, 'name', type(source).__name__)!r}"] = source.protocol
    if len(set(found.values())) > 1:
        listed = "; ".join(f"{where}: {p.summary()}" for where, p in found.items())
        raise ProtocolError(f"extraction got different evaluation protocols ({listed}); build the datasets and "
                            "the extraction with the same one")
    return next(iter(found.values()), None)


def plan_batches(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Deterministic batches of equal-size images.

    Indices are grouped by exact ``(H, W)``; groups are ordered largest area first (ties by
    H, then W), indices ascend inside a group, and each group is cut into batches of at most
    ``batch_size`` (only a group's last batch is smaller). Every index appears exactly once.
    """
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batch_size = int(batch_size)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        h, w = (int(v) for v in size)
        if h < 1 or w < 1:
            raise ValueError(f"image {i} has an empty size {tuple(size)}")
        groups.setdefault((h, w), []).append(i)
    plan: list[list[int]] = []
    for key in sorted(groups, key=lambda hw: (-hw[0] * hw[1], hw[0], hw[1])):
        idx = groups[key]
        plan.extend(idx[s:s + batch_size] for s in range(0, len(idx), batch_size))
    return plan


class _Tolerant(Dataset):
    """Wraps a dataset so that an unreadable image yields ``(None, i, error)`` instead of raising."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            image, index = self.dataset[i]
        except ImageReadError as e:
            return None, int(i), e
        return image, index, None


def _collate(items: list[tuple[Tensor | None, int, ImageReadError | None]]):
    good = [(img, i) for img, i, _ in items if img is not None]
    failed = [(i, err) for _, i, err in items if err is not None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), failed
    shapes = {tuple(img.shape) for img, _ in good}
    if len(shapes) != 1:
        raise RuntimeError(f"images {[i for _, i in good]} of one planned batch have different shapes {sorted(shapes)}: "
                           "the dataset's image_sizes() disagrees with its items")
    return torch.stack([img for img, _ in good]), torch.tensor([i for _, i in good], dtype=torch.long), failed


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def extract_descriptors(
    model: nn.Module,
    dataset: Any,
    *,
    protocol: str | EvalProtocol | None = None,
    scales: Sequence[float] | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    desc: str | None = None,
    on_unreadable: Callable[[int, ImageReadError], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Descriptors of the batches this shard owns: ``(indices (n,) int64, descriptors (n, D) float32)``, CPU.

    Runs ``model.extract(images, scales)`` under ``model.eval()`` and ``torch.inference_mode()``
    (every submodule's train/eval flag is restored afterwards), without autocast; under an
    evaluation protocol the model is a :class:`ProtocolModel` of it. The plan is
    :func:`plan_batches` of ``dataset.image_sizes()``; shard ``(rank, world)`` takes batches
    ``plan[rank::world]``, in plan order.

    Args:
        protocol: the evaluation protocol (a name or an ``EvalProtocol``); None: the bound model's
            or the dataset's, if any (see the module docstring). ``ProtocolError`` when the
            argument, a bound model and the dataset name different protocols.
        scales: extraction scales (None: the protocol's, else the model's default); under a
            protocol, other scales make it the protocol's "custom" variant.
        device: where images go; must be where the model is (None: the model's device).
        on_unreadable: None: an unreadable image raises. Otherwise it is called with
            ``(index, error)``, the image is left out of its batch and gets no row.
    """
    rank, world = (int(v) for v in shard)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
    resolved = _resolve_protocol(model, dataset, protocol)
    if resolved is not None:
        model = bind_protocol(model, resolved if scales is None else resolved.customised(scales=scales))
        scales = None
    model_device = _model_device(model)
    device = model_device if device is None else torch.device(device)
    if device.type != model_device.type or (device.index is not None and model_device.index is not None
                                            and device.index != model_device.index):
        raise ValueError(f"device {device} differs from the model's device {model_device}; move the model first")
    sizes = dataset.image_sizes()
    if len(sizes) != len(dataset):
        raise ValueError(f"dataset.image_sizes() gives {len(sizes)} sizes for {len(dataset)} items")
    plan = plan_batches(sizes, batch_size)[rank::world]
    # A private generator: starting the loader draws a worker seed, and drawing it from the global
    # RNG would make training results depend on when (and whether) retrieval evaluation runs.
    loader = DataLoader(_Tolerant(dataset), batch_sampler=plan, num_workers=int(num_workers), collate_fn=_collate,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))
    modes = {m: m.training for m in model.modules()}
    indices: list[Tensor] = []
    descriptors: list[Tensor] = []
    bar = progress_bar(total=sum(len(b) for b in plan), desc=desc or f"extract {getattr(dataset, 'name', '')}".rstrip(),
                       unit="img", enabled=progress, leave=False)
    try:
        model.eval()
        with torch.inference_mode():
            for images, idx, failed in loader:
                for i, err in failed:
                    if on_unreadable is None:
                        raise err
                    on_unreadable(i, err)
                if images is not None:
                    out = model.extract(images.to(device, non_blocking=True), scales)
                    descriptors.append(out.float().cpu())
                    indices.append(idx)
                bar.update(len(idx) + len(failed))
    finally:
        bar.close()
        for m, training in modes.items():
            m.training = training
    if not descriptors:
        dim = int(getattr(model, "embedding_dim", 0))
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dim, dtype=torch.float32)
    return torch.cat(indices), torch.cat(descriptors)


def _world_first(t: Tensor, gathered: Tensor) -> Tensor:
    """``all_gather`` output as ``(world, ...)``: Lightning returns the input itself for world 1."""
    return gathered.unsqueeze(0) if gathered.ndim == t.ndim else gathered


def gather_descriptors(
    indices: Tensor,
    descriptors: Tensor,
    num_items: int,
    all_gather: Callable[[Tensor], Tensor],
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """Assemble every rank's shard into ``(num_items, D)`` float32 on the CPU, row i = item i.

    ``all_gather`` behaves like ``LightningModule.all_gather``: ``(n, ...) -> (world, n, ...)``,
    or the input unchanged for one process. Shards are padded to the largest shard (the
    sizes are gathered first) with index -1, gathered, unpadded and placed by index. An index
    seen twice must carry the same row (e.g. a sampler's padding); a differing duplicate, an
    index out of range, or an item no rank computed raises ``ValueError``.

    Args:
        device: where the tensors are gathered (NCCL needs the rank's GPU); None: as given.
    """
    indices = indices.reshape(-1).long()
    if descriptors.ndim != 2 or descriptors.shape[0] != indices.shape[0]:
        raise ValueError(f"descriptors must be (n, D) with n = len(indices) = {indices.shape[0]}, "
                         f"got {tuple(descriptors.shape)}")
    device = descriptors.device if device is None else torch.device(device)
    n_local, dim_local = descriptors.shape
    shape = torch.tensor([n_local, dim_local], device=device)
    counts = _world_first(shape, all_gather(shape)).cpu()
    longest = int(counts[:, 0].max())
    dims = {int(d) for n, d in counts.tolist() if n > 0}
    if len(dims) > 1:
        raise ValueError(f"ranks hold descriptors of different sizes {sorted(dims)}")
    dim = dims.pop() if dims else int(dim_local)
    idx_pad = torch.full((longest,), -1, dtype=torch.long, device=device)
    idx_pad[:n_local] = indices.to(device)
    desc_pad = torch.zeros(longest, dim, dtype=torch.float32, device=device)
    desc_pad[:n_local] = descriptors.to(device=device, dtype=torch.float32)
    all_idx = _world_first(idx_pad, all_gather(idx_pad)).reshape(-1).cpu()
    all_desc = _world_first(desc_pad, all_gather(desc_pad)).reshape(-1, dim).cpu()
    keep = all_idx >= 0
    all_idx, all_desc = all_idx[keep], all_desc[keep]

    if all_idx.numel() and int(all_idx.max()) >= num_items:
        raise ValueError(f"index {int(all_idx.max())} is out of range for {num_items} items")
    out = torch.zeros(num_items, dim, dtype=torch.float32)
    seen = torch.zeros(num_items, dtype=torch.bool)
    order = torch.argsort(all_idx, stable=True)
    all_idx, all_desc = all_idx[order], all_desc[order]
    first = torch.ones_like(all_idx, dtype=torch.bool)
    first[1:] = all_idx[1:] != all_idx[:-1]
    out[all_idx[first]] = all_desc[first]
    seen[all_idx] = True
    dup = ~first
    if dup.any():
        differing = ~(all_desc[dup] == out[all_idx[dup]]).all(dim=1)
        if differing.any():
            bad = all_idx[dup][differing][:5].tolist()
            raise ValueError(f"items {bad} were computed more than once with different descriptors")
    if not seen.all():
        missing = torch.nonzero(~seen).reshape(-1)
        raise ValueError(f"{missing.numel()} of {num_items} items have no descriptor (first: {missing[:5].tolist()})")
    return out


def extract_all(model: nn.Module, dataset: Any, **kwargs: Any) -> Tensor:
    """All descriptors of ``dataset`` in one process: ``(len(dataset), D)`` float32 (CPU), row i = item i."""
    if "shard" in kwargs:
        raise TypeError("extract_all runs one process; use extract_descriptors + gather_descriptors for shards")
    indices, descriptors = extract_descriptors(model, dataset, **kwargs)
    return gather_descriptors(indices, descriptors, len(dataset), lambda t: t)
