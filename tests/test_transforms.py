"""albumentations pipelines: shapes, dtypes, normalisation, channel order, argument names."""

import warnings

import albumentations as A
import numpy as np
import pytest
import torch

from datamodules.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_eval_transform,
    build_train_transform,
    resolve_normalization,
)

RGB = (200, 100, 50)


def _const(h, w, rgb=RGB):
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def _expected(rgb, mean, std):
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, mean, std)], dtype=torch.float32)


def _plain_train(**kw):
    return build_train_transform(hflip_p=0, color_jitter=0, jpeg_p=0, **kw)


def test_train_shape_dtype_and_normalisation():
    t = _plain_train(image_size=48)
    out = t(image=_const(70, 90))["image"]
    assert isinstance(out, torch.Tensor) and out.shape == (3, 48, 48) and out.dtype == torch.float32
    exp = _expected(RGB, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(out.mean((1, 2)), exp, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std((1, 2)), torch.zeros(3), atol=1e-4, rtol=0)


def test_train_rectangular_and_tiny_and_extreme_inputs():
    t = build_train_transform(image_size=(32, 48))
    for shape in [(1, 1, 3), (1, 2000, 3), (2000, 1, 3), (600, 800, 3)]:
        x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        assert t(image=x)["image"].shape == (3, 32, 48)


def test_bgr_order_and_default_stats():
    mean, std = resolve_normalization(None, None, "bgr")
    assert mean == IMAGENET_MEAN[::-1] and std == IMAGENET_STD[::-1]
    assert mean == (0.406, 0.456, 0.485) and std == (0.225, 0.224, 0.229)  # CVNet's constants
    for t in (_plain_train(image_size=16, input_format="bgr"), build_eval_transform(16, input_format="bgr")):
        out = t(image=_const(20, 20))["image"]
        exp = _expected(RGB[::-1], mean, std)  # channel 0 is blue
        torch.testing.assert_close(out.mean((1, 2)), exp, atol=1e-4, rtol=0)


def test_explicit_mean_std_are_in_model_order():
    t = build_eval_transform(None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    out = t(image=_const(4, 4))["image"]
    torch.testing.assert_close(out[:, 0, 0], _expected(RGB, (0.5,) * 3, (0.25,) * 3), atol=1e-5, rtol=0)


def test_eval_resize_longest_side_and_pad():
    x = _const(30, 60)
    assert build_eval_transform(64)(image=x)["image"].shape == (3, 32, 64)
    assert build_eval_transform(None)(image=x)["image"].shape == (3, 30, 60)
    out = build_eval_transform(64, pad_to_square=True)(image=x)["image"]
    assert out.shape == (3, 64, 64)
    assert torch.all(out[:, 32:, :] == 0)  # padding = zeros after normalisation (the mean colour)
    torch.testing.assert_close(
        out[:, :32, :].mean((1, 2)), _expected(RGB, IMAGENET_MEAN, IMAGENET_STD), atol=1e-4, rtol=0
    )
    tall = build_eval_transform(64, pad_to_square=True)(image=_const(100, 10))["image"]
    assert tall.shape == (3, 64, 64)


def test_arguments_reach_albumentations_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = build_train_transform(
            image_size=(40, 50),
            scale=(0.3, 0.9),
            ratio=(0.5, 2.0),
            hflip_p=0.3,
            color_jitter=0.2,
            color_jitter_hue=0.05,
            color_jitter_p=0.7,
            jpeg_quality=(40, 90),
            jpeg_p=0.6,
        )
        e = build_eval_transform(32, pad_to_square=True)
    by = {type(x).__name__: x for x in t.transforms}
    assert by["RandomResizedCrop"].size == (40, 50)
    assert tuple(by["RandomResizedCrop"].scale) == (0.3, 0.9)
    assert tuple(by["RandomResizedCrop"].ratio) == (0.5, 2.0)
    assert by["HorizontalFlip"].p == 0.3
    cj = by["ColorJitter"]
    assert tuple(cj.brightness) == pytest.approx((0.8, 1.2)) and tuple(cj.hue) == pytest.approx((-0.05, 0.05))
    assert cj.p == 0.7
    assert tuple(by["ImageCompression"].quality_range) == (40, 90) and by["ImageCompression"].p == 0.6
    eby = {type(x).__name__: x for x in e.transforms}
    assert eby["LongestMaxSize"].max_size == 32
    assert (eby["PadIfNeeded"].min_height, eby["PadIfNeeded"].min_width) == (32, 32)


def test_disabled_augmentations_are_left_out():
    names = [type(x).__name__ for x in _plain_train(image_size=8).transforms]
    assert names == ["RandomResizedCrop", "Normalize", "ToTensorV2"]


def test_seeded_pipeline_is_deterministic():
    x = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    a = build_train_transform(image_size=32, seed=5)(image=x)["image"]
    b = build_train_transform(image_size=32, seed=5)(image=x)["image"]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "kw",
    [
        {"input_format": "hsv"},
        {"scale": (0.9, 0.1)},
        {"scale": (0.0, 1.0)},
        {"jpeg_quality": (0, 100)},
        {"color_jitter": 1.5},
        {"mean": (0.5, 0.5)},
        {"std": (0.2, 0.0, 0.2)},
    ],
)
def test_bad_arguments(kw):
    with pytest.raises(ValueError):
        build_train_transform(image_size=16, **kw)


def test_compose_type():
    assert isinstance(build_train_transform(8), A.Compose) and isinstance(build_eval_transform(8), A.Compose)
