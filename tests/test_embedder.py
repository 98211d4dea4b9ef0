"""sg_train.load_model / Embedder: descriptors of any images, exactly as retrieval evaluation makes them."""
from __future__ import annotations

import shutil
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from PIL import Image

import sg_train
from datamodules.revisited import EvalImageDataset, RevisitedDataset
from sg_train.embedder import Embedder, load_model
from sg_train.errors import UserInputError
from sg_train.eval_protocols import ProtocolError, get_protocol
from sg_train.extraction import extract_all
from sg_train.image_io import ImageReadError, read_image
from sg_train.model import EmbeddingModel
from sg_train.module import LandmarkRetrievalModule


def write_checkpoint(path: Path, *, seed: int = 0, class_names: list[str] | None = None) -> Path:
    """A tiny sg-train checkpoint (resnet18, R-GeM + GeM+ + S-GeM, 32-d) written by Lightning, so
    it carries the sg-train record (as in tests/test_checkpoint_config.py); ``class_names`` are
    put into the record afterwards."""
    torch.manual_seed(seed)
    module = LandmarkRetrievalModule(num_classes=3, backbone="resnet18", head="rgem+gemp+sgem", embedding_dim=32)
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    if class_names is not None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        checkpoint["sg_train"]["class_names"] = class_names
        torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt")


@pytest.fixture(scope="module")
def embedder(checkpoint) -> Embedder:
    return load_model(checkpoint)


def database(root: Path, model: torch.nn.Module, protocol: str) -> RevisitedDataset:
    return RevisitedDataset(root, "rsynth", "database", mean=model.mean, std=model.std,
                            input_format=model.input_format, protocol=protocol)


@pytest.mark.parametrize(("protocol", "batch_size"), [("revisitop", 3), ("superglobal", 32)])
def test_embed_equals_the_retrieval_evaluation_descriptors_of_database_images(embedder, checkpoint, tiny_benchmark,
                                                                               protocol, batch_size):
    if protocol != "revisitop":
        embedder = load_model(checkpoint, protocol=protocol)
    data = database(tiny_benchmark, embedder.model, protocol)
    expected = extract_all(embedder.model, data, progress=False).numpy()
    assert len({tuple(s) for s in data.image_sizes()}) > 1  # images of several sizes: several batches

    got = embedder.embed(data.paths, batch_size=batch_size)  # 3: decode windows of 12 and 3 images; 32: one
    assert got.dtype == np.float32 and got.shape == (len(data), 32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    assert embedder.protocol == get_protocol(protocol)


def test_a_bgr_model_gets_its_own_channel_order_and_other_scales_make_a_custom_protocol(tiny_benchmark):
    model = EmbeddingModel("resnet18", "gem", 32, input_format="bgr", mean=(0.2, 0.3, 0.4), std=(0.5, 0.6, 0.7))
    embedder = Embedder(model, scales=[1.0, 0.5])
    assert embedder.protocol.name == "custom" and embedder.scales == (1.0, 0.5)
    paths = sorted((tiny_benchmark / "rsynth" / "jpg").glob("*.jpg"))[:5]
    data = EvalImageDataset(paths, mean=model.mean, std=model.std, input_format="bgr")  # a database split's images
    expected = extract_all(model, data, scales=[1.0, 0.5], progress=False).numpy()
    np.testing.assert_allclose(embedder.embed(data.paths), expected, rtol=0, atol=1e-6)
    rgb = Embedder(EmbeddingModel("resnet18", "gem", 32, mean=(0.4, 0.3, 0.2), std=(0.7, 0.6, 0.5)), scales=[1.0, 0.5])
    rgb.model.load_state_dict(model.state_dict())
    # The same weights fed RGB (statistics reversed to match): the channel order is what differs.
    assert not np.allclose(rgb.embed(data.paths[:3]), expected[:3], atol=1e-3)


def test_path_pil_and_array_inputs_of_one_image_give_one_descriptor(embedder, tiny_benchmark, tmp_path):
    source = next((tiny_benchmark / "rsynth" / "jpg").glob("b000_0*.jpg"))
    png = tmp_path / "image.png"
    Image.fromarray(read_image(source)).save(png)  # lossless: every route decodes the same pixels
    pixels = read_image(png)
    with Image.open(png) as lazy:
        got = embedder.embed([str(png), png, lazy, pixels, Image.fromarray(pixels).convert("RGBA")])
    # (equal pixels; batched together or alone, only the float summation order differs)
    np.testing.assert_allclose(got, np.repeat(got[:1], len(got), axis=0), rtol=0, atol=1e-6)
    single = embedder.embed(png)  # one image, not a list
    assert single.shape == (1, 32)
    np.testing.assert_allclose(single, got[:1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(embedder.embed(np.stack([pixels, pixels])), got[:2], rtol=0, atol=1e-6)  # (N, H, W, 3)
    other = read_image(next((tiny_benchmark / "rsynth" / "jpg").glob("x000_*.jpg")))
    assert not np.allclose(embedder.embed(other), single, atol=1e-3)
    assert embedder.embed([]).shape == (0, 32)


def test_a_pil_image_gets_the_exif_orientation_a_file_gets(embedder, tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (40, 64, 3), dtype=np.uint8)
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    Image.fromarray(pixels).save(path, quality=95, exif=exif)
    with Image.open(path) as image:
        as_stored = np.asarray(image)  # (40, 64): the pixels before the orientation
        from_pil = embedder.embed(image)
    from_file = embedder.embed(path)
    np.testing.assert_allclose(from_pil, from_file, rtol=0, atol=1e-6)  # both decoders: libjpeg-turbo
    assert not np.allclose(embedder.embed(as_stored), from_file, atol=1e-3)


def test_an_unreadable_image_is_named_and_can_be_left_out(embedder, tiny_benchmark, tmp_path):
    good = sorted((tiny_benchmark / "rsynth" / "jpg").glob("*.jpg"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:200])  # a truncated JPEG
    with pytest.raises(ImageReadError, match=r"(?i)broken\.jpg.*truncated"):
        embedder.embed([good[0], broken, good[1]])
    with pytest.raises(ImageReadError, match=r"missing\.png.*file not found"):
        embedder.embed(tmp_path / "missing.png")

    rows, descriptors, unreadable = embedder.embed_readable([good[0], broken, good[1], tmp_path / "missing.png",
                                                             good[2]], batch_size=1)  # two decode windows
    assert rows.tolist() == [0, 2, 4] and descriptors.shape == (3, 32)
    assert [(i, Path(err.path).name) for i, err in unreadable] == [(1, "broken.jpg"), (3, "missing.png")]
    np.testing.assert_allclose(descriptors, embedder.embed(good), rtol=0, atol=1e-6)


def test_bad_inputs_fail_before_any_work(embedder):
    with pytest.raises(UserInputError, match=r"image 1 is a numpy array of shape \(8, 8\) and dtype uint8"):
        embedder.embed([np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), np.uint8)])
    with pytest.raises(UserInputError, match="dtype float32"):
        embedder.embed(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="image 0 is a int"):
        embedder.embed([3])
    with pytest.raises(UserInputError, match="batch_size must be a positive integer, got 0"):
        embedder.embed(np.zeros((8, 8, 3), np.uint8), batch_size=0)
    with pytest.raises(ProtocolError, match="max_size"):
        Embedder(embedder.model, protocol=get_protocol("revisitop").customised(max_size=512))
    with pytest.raises(ProtocolError, match="unknown evaluation protocol 'oxford'"):
        Embedder(embedder.model, protocol="oxford")


def test_an_array_with_alpha_is_embedded_without_it_as_a_file_with_alpha_is(embedder, tmp_path):
    rgba = np.random.default_rng(1).integers(0, 256, (40, 56, 4), dtype=np.uint8)  # alpha varies per pixel
    png = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(png)
    np.testing.assert_array_equal(read_image(png), rgba[..., :3])  # the file route drops alpha (no blending)
    got = embedder.embed([rgba, png, np.ascontiguousarray(rgba[..., :3])])
    np.testing.assert_allclose(got, np.repeat(got[:1], 3, axis=0), rtol=0, atol=1e-6)
    np.testing.assert_allclose(embedder.embed(np.stack([rgba, rgba])), got[:2], rtol=0, atol=1e-6)  # (N, H, W, 4)


@pytest.mark.parametrize(("array", "hints"), [
    (np.zeros((8, 8), np.uint8), ["greyscale", "np.stack([x] * 3, -1)"]),
    (np.zeros((8, 8, 1), np.uint8), ["one channel", "np.repeat(x, 3, -1)"]),
    (np.zeros((3, 8, 8), np.uint8), ["channels first", "x.transpose(1, 2, 0)"]),
    (np.zeros((4, 8, 8), np.uint8), ["channels first", "x.transpose(1, 2, 0)"]),
    (np.zeros((8, 8, 5), np.uint8), ["(H, W, 3) RGB or (H, W, 4) RGBA"]),
    (np.zeros((0, 8, 3), np.uint8), ["no pixels"]),
    (np.zeros((8, 8, 3), np.float32), ["uint8 0..255", "(x * 255).round().astype(np.uint8)"]),
    (np.zeros((8, 8, 3), np.uint16), ["uint8 0..255", "(x >> 8).astype(np.uint8)"]),
    (np.zeros((3, 8, 8), np.float64), ["x.transpose(1, 2, 0)", "(x * 255).round().astype(np.uint8)"]),
], ids=["greyscale", "one-channel", "chw", "chw-rgba", "five-channels", "empty", "float", "uint16", "float-chw"])
def test_an_array_of_another_layout_or_dtype_is_told_the_conversion_it_needs(embedder, array, hints):
    with pytest.raises(UserInputError) as caught:
        embedder.embed([np.zeros((8, 8, 3), np.uint8), array])
    message = str(caught.value)
    assert message.startswith(f"image 1 is a numpy array of shape {array.shape} and dtype {array.dtype}")
    assert "\n" not in message and all(hint in message for hint in hints), message
    assert ("np.stack" in message) == (array.ndim == 2)  # the greyscale recipe only for greyscale


def test_properties_and_class_names_from_the_checkpoint_record(embedder, checkpoint, tmp_path):
    assert sg_train.load_model is load_model  # imported on first use
    assert isinstance(embedder.model, EmbeddingModel) and not embedder.model.training
    assert embedder.embedding_dim == 32
    assert embedder.preprocessing == embedder.model.preprocessing
    assert embedder.preprocessing["input_format"] == "rgb" and embedder.preprocessing["scale"] == 1 / 255
    assert embedder.class_names is None  # the record stores none
    assert embedder.checkpoint == checkpoint and len(embedder.fingerprint) == 64

    named = tmp_path / "named.ckpt"
    shutil.copy(checkpoint, named)
    saved = torch.load(named, map_location="cpu", weights_only=False)
    saved["sg_train"]["class_names"] = ["eiffel", "big ben", "sagrada família"]
    torch.save(saved, named)
    other = load_model(named)
    assert other.class_names == ["eiffel", "big ben", "sagrada família"]
    assert other.fingerprint == embedder.fingerprint  # same weights, protocol and preprocessing
    assert load_model(named, scales=[1.0]).fingerprint != embedder.fingerprint
