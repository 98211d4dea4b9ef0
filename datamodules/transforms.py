"""albumentations 2.x pipelines: RGB ``uint8`` HWC array in, normalised float ``(3, H, W)`` tensor out.

Channel order and normalisation live here. ``input_format`` is the channel order the *model*
sees ("rgb", or "bgr" for CVNet-style weights); ``mean``/``std`` are given in that same order
and default to ImageNet's statistics in that order. CVNet, for instance, is
``input_format="bgr", mean=(0.406, 0.456, 0.485), std=(0.225, 0.224, 0.229)`` -- which is also
what the defaults give for "bgr".

Both builders return an ``albumentations.Compose``; call it as ``t(image=rgb_uint8)["image"]``.
Argument names were checked against albumentations 2.0.8 (``RandomResizedCrop(size=...)``,
``ImageCompression(quality_range=...)``, ``PadIfNeeded(fill=...)``), which ignores unknown
arguments with only a warning.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI look-up at import

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.pytorch import ToTensorV2  # noqa: E402

from sg_train.errors import OptionError  # noqa: E402

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ToBGR",
    "build_eval_transform",
    "build_train_transform",
    "resolve_normalization",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # RGB order
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)  # RGB order

InputFormat = Literal["rgb", "bgr"]


class ToBGR(A.ImageOnlyTransform):
    """Reverse the channel order (RGB -> BGR)."""

    def __init__(self, p: float = 1.0):
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return np.ascontiguousarray(img[..., ::-1])

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


def resolve_normalization(
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_format: InputFormat = "rgb",
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std in the model's channel order; ``None`` means ImageNet's in that order."""
    fmt = _check_format(input_format)
    if mean is None:
        mean = IMAGENET_MEAN if fmt == "rgb" else IMAGENET_MEAN[::-1]
    if std is None:
        std = IMAGENET_STD if fmt == "rgb" else IMAGENET_STD[::-1]
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise OptionError(f"mean and std need 3 values each, got mean={mean}, std={std}")
    if any(s <= 0 for s in std):
        raise OptionError(f"std must be positive, got {std}")
    return mean, std


def _check_format(input_format: str) -> str:
    fmt = str(input_format).lower()
    if fmt not in ("rgb", "bgr"):
        raise OptionError(f"input_format must be 'rgb' or 'bgr', got {input_format!r}")
    return fmt


def _normalize_tail(mean, std, input_format) -> list:
    mean, std = resolve_normalization(mean, std, input_format)
    tail = [ToBGR()] if _check_format(input_format) == "bgr" else []
    return tail + [A.Normalize(mean=mean, std=std, max_pixel_value=255.0)]


def _pair(v, name: str, cast=float) -> tuple:
    v = tuple(cast(x) for x in v)
    if len(v) != 2 or v[0] > v[1]:
        raise OptionError(f"{name} must be a (low, high) pair, got {v}")
    return v


def build_train_transform(
    image_size: int | Sequence[int] = 512,
    scale: Sequence[float] = (0.25, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip_p: float = 0.5,
    color_jitter: float = 0.3,
    color_jitter_hue: float = 0.0,
    color_jitter_p: float = 0.5,
    jpeg_quality: Sequence[int] = (50, 100),
    jpeg_p: float = 0.25,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_format: InputFormat = "rgb",
    seed: int | None = None,
) -> A.Compose:
    """Training pipeline: RandomResizedCrop -> HorizontalFlip -> ColorJitter -> JPEG -> normalise.

    Args:
        image_size: output crop, ``int`` (square) or ``(h, w)``.
        scale, ratio: area fraction and aspect range of RandomResizedCrop (downscaling uses
            INTER_AREA, upscaling bilinear).
        hflip_p: horizontal flip probability (0 disables).
        color_jitter: brightness/contrast/saturation strength ``s`` (factor in ``[1-s, 1+s]``);
            0 disables colour jitter.
        color_jitter_hue: hue shift range ``[-h, h]`` (0.5 = full circle).
        color_jitter_p: probability colour jitter is applied.
        jpeg_quality: ``(low, high)`` JPEG re-compression quality; ``jpeg_p``: its probability.
        mean, std, input_format: see the module docstring.
        seed: seed of the pipeline's own RNG (``None``: from the OS). DataLoader workers are
            re-seeded by :func:`datamodules.image_dataset.worker_init_fn`.
    """
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(int(x) for x in image_size)
    scale = _pair(scale, "scale")
    ratio = _pair(ratio, "ratio")
    if not (0 < scale[0] <= scale[1] <= 1):
        raise OptionError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
    q = _pair(jpeg_quality, "jpeg_quality", int)
    if not (1 <= q[0] <= q[1] <= 100):
        raise OptionError(f"jpeg_quality must lie in [1, 100], got {q}")
    ts: list = [A.RandomResizedCrop(size=(h, w), scale=scale, ratio=ratio, area_for_downscale="image")]
    if hflip_p > 0:
        ts.append(A.HorizontalFlip(p=hflip_p))
    if (color_jitter > 0 or color_jitter_hue > 0) and color_jitter_p > 0:
        s = float(color_jitter)
        if not 0 <= s < 1:
            raise OptionError(f"color_jitter must lie in [0, 1), got {s}")
        if not 0 <= color_jitter_hue <= 0.5:
            raise OptionError(f"color_jitter_hue must lie in [0, 0.5], got {color_jitter_hue}")
        hue = float(color_jitter_hue)
        ts.append(
            A.ColorJitter(
                brightness=(1 - s, 1 + s),
                contrast=(1 - s, 1 + s),
                saturation=(1 - s, 1 + s),
                hue=(-hue, hue),
                p=color_jitter_p,
            )
        )
    if jpeg_p > 0:
        ts.append(A.ImageCompression(compression_type="jpeg", quality_range=q, p=jpeg_p))
    ts += _normalize_tail(mean, std, input_format)
    ts.append(ToTensorV2())
    return A.Compose(ts, seed=seed)


def build_eval_transform(
    image_size: int | None = None,
    pad_to_square: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    input_format: InputFormat = "rgb",
) -> A.Compose:
    """Evaluation pipeline: (resize longest side to ``image_size``) -> normalise -> (pad) -> tensor.

    ``image_size=None`` keeps the original size (e.g. for multi-scale extraction that resizes
    tensors itself). ``pad_to_square`` pads bottom/right to ``image_size x image_size`` *after*
    normalisation with zeros, i.e. with the mean colour, so that images batch.
    """
    ts: list = []
    if image_size is not None:
        ts.append(A.LongestMaxSize(max_size=int(image_size), area_for_downscale="image"))
    elif pad_to_square:
        raise OptionError("pad_to_square needs an image_size")
    ts += _normalize_tail(mean, std, input_format)
    if pad_to_square:
        ts.append(
            A.PadIfNeeded(
                min_height=int(image_size),
                min_width=int(image_size),
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
            )
        )
    ts.append(ToTensorV2())
    return A.Compose(ts, seed=0)
