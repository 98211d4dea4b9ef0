"""Evaluation protocols: the published preprocessing of revisitop and SuperGlobal, selected in the
dataset, the extraction, evaluate.py and the retrieval callback, and recorded in results and cache keys.

The issue's small input: a 100 x 80 (W x H) query with ``bbx = [10.6, 8.6, 90.6, 72.6]`` is
columns 10..89, rows 8..71 under SuperGlobal's ``int()`` and columns 11..90, rows 9..72 under
revisitop's rounding (Pillow's crop). Pixels encode their coordinates, so a crop one pixel off
cannot pass.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import evaluate
from test_evaluate_model import random_cvnet_checkpoint
from callbacks.retrieval_eval import RetrievalEvalCallback
from datamodules.gldv2 import GLDv2DataModule
from datamodules.revisited import RevisitedDataset
from sg_train.cvnet import CVNET_MEAN_BGR, CVNET_STD_BGR
from sg_train.descriptor_cache import descriptor_key
from sg_train.eval_protocols import EVAL_PROTOCOLS, REVISITOP, SUPERGLOBAL, ProtocolError, get_protocol
from sg_train.extraction import ProtocolModel, extract_all
from sg_train.model import EmbeddingModel, scaled_size
from sg_train.module import LandmarkRetrievalModule
from sg_train.synthetic.writers import write_revisited_gnd

NAME = "rcrop"
BBX = [10.6, 8.6, 90.6, 72.6]
#: (rows, columns) of the query crop, end exclusive
CROPS = {"superglobal": (slice(8, 72), slice(10, 90)), "revisitop": (slice(9, 73), slice(11, 91))}
IMAGENET_RGB = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _coded(height: int, width: int) -> np.ndarray:
    """RGB uint8 image whose pixel (y, x) is (2x, 3y, 255 - x): every crop offset shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([2 * x, 3 * y, 255 - x], axis=-1).astype(np.uint8)


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    """``<root>/rcrop``: one 100 x 80 query with the issue's box, three 50 x 60 database images."""
    root = tmp_path_factory.mktemp("protocols")
    jpg = root / NAME / "jpg"
    jpg.mkdir(parents=True)
    Image.fromarray(_coded(80, 100)).save(jpg / "q0.jpg", format="PNG")  # lossless: exact pixels
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (60, 50, 3), dtype=np.uint8)).save(jpg / f"db{i}.jpg", format="PNG")
    write_revisited_gnd(root, NAME, ["db0", "db1", "db2"], ["q0"], [{"bbx": BBX, "easy": [0], "hard": [1], "junk": []}])
    return root


def _expected_input(protocol: str, input_format: str, mean, std) -> torch.Tensor:
    """The query at scale 1 as the model must receive it: crop, channel order, /255, mean/std."""
    crop = _coded(80, 100)[CROPS[protocol]]
    pixels = crop[..., ::-1] if input_format == "bgr" else crop
    x = torch.from_numpy(np.ascontiguousarray(pixels).astype(np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _record_query_inputs(model: torch.nn.Module, seen: list) -> None:
    """Record every input of the ResNet's first conv of the query's scale-1 size (64 x 80; no database
    image has it at any scale)."""
    def hook(module, args):
        if tuple(args[0].shape[-2:]) == (64, 80):
            seen.append(args[0].detach().clone())

    model.backbone.conv1.register_forward_pre_hook(hook)


# ------------------------------------------------------------------------------ the published settings
def test_protocol_settings_are_the_published_ones():
    assert sorted(EVAL_PROTOCOLS) == ["revisitop", "superglobal"]
    assert SUPERGLOBAL.scales == (0.7071, 1.0, 1.4142)  # model/resnet.py literals, not 1/sqrt(2), sqrt(2)
    assert (SUPERGLOBAL.bbx_rounding, SUPERGLOBAL.antialias, SUPERGLOBAL.max_size) == ("trunc", False, None)
    assert SUPERGLOBAL.input_format == "bgr"
    assert SUPERGLOBAL.mean == (0.406, 0.456, 0.485) == CVNET_MEAN_BGR and SUPERGLOBAL.std == (0.225, 0.224, 0.229)
    assert REVISITOP.scales == (1 / math.sqrt(2), 1.0, math.sqrt(2))
    assert (REVISITOP.bbx_rounding, REVISITOP.antialias, REVISITOP.max_size, REVISITOP.input_format) == (
        "round", True, None, None)
    assert SUPERGLOBAL.crop_box(BBX) == (10, 8, 90, 72) and REVISITOP.crop_box(BBX) == (11, 9, 91, 73)
    img = Image.fromarray(_coded(80, 100))
    assert np.array_equal(np.asarray(img.crop(BBX)), _coded(80, 100)[CROPS["revisitop"]])  # Pillow rounds
    # the literals give other sizes than exact 1/sqrt(2), sqrt(2) for some images: int(h*s) both
    assert scaled_size(169, 338, SUPERGLOBAL.scales[2]) == (238, 477)
    assert scaled_size(169, 338, REVISITOP.scales[2]) == (239, 478)


def test_superglobal_resize_is_the_published_torchvision_call():
    """``torchvision...resize(x_, [int(h*scl), int(w*scl)])`` on a tensor, antialias unset: False before
    torchvision 0.17 (what produced the published numbers); revisitop's resize antialiases."""
    x = torch.randn(2, 3, 61, 83)
    for s in SUPERGLOBAL.scales:
        size = [int(61 * s), int(83 * s)]
        assert torch.equal(SUPERGLOBAL.resize(x, s), TF.resize(x, size, antialias=False))
    assert torch.allclose(REVISITOP.resize(x, REVISITOP.scales[0]),
                          TF.resize(x, [int(61 / math.sqrt(2)), int(83 / math.sqrt(2))], antialias=True), atol=1e-5)
    assert not torch.allclose(SUPERGLOBAL.resize(x, 0.7071), REVISITOP.resize(x, 0.7071), atol=1e-3)


def test_revisitop_extraction_is_the_models_own():
    """The revisitop protocol reproduces what the callback measured before protocols existed."""
    model = EmbeddingModel("resnet18", head="gem+sgem", embedding_dim=8).eval()
    x = torch.randn(2, 3, 45, 37)
    with torch.no_grad():
        assert torch.equal(ProtocolModel(model, "revisitop").extract(x), model.extract(x, REVISITOP.scales))


def test_names_and_custom_variants():
    assert get_protocol("superglobal") is SUPERGLOBAL and get_protocol(REVISITOP) is REVISITOP
    with pytest.raises(ProtocolError, match=r"unknown evaluation protocol 'cirtorch'; valid: \['revisitop', 'superglobal'\]"):
        get_protocol("cirtorch")
    assert SUPERGLOBAL.customised(scales=[0.7071, 1, 1.4142]) is SUPERGLOBAL  # the same settings: still published
    custom = SUPERGLOBAL.customised(scales=[1.0], max_size=512)
    assert (custom.name, custom.base, custom.scales, custom.max_size) == ("custom", "superglobal", (1.0,), 512)
    assert custom.describe()["base"] == "superglobal" and custom.customised(max_size=64).base == "superglobal"
    with pytest.raises(ProtocolError, match="max_size must be a positive number of pixels or None, got 0"):
        REVISITOP.customised(max_size=0)


def test_colours_the_protocol_fixes_are_checked_per_colour(bench):
    kwargs = {"root": bench, "name": NAME, "split": "query", "protocol": "superglobal"}
    RevisitedDataset(**kwargs, mean=CVNET_MEAN_BGR, std=CVNET_STD_BGR, input_format="bgr")  # CVNet: exactly
    RevisitedDataset(**kwargs, mean=IMAGENET_RGB[0], std=IMAGENET_RGB[1], input_format="rgb")  # same per colour
    with pytest.raises(ProtocolError, match=r"protocol 'superglobal' feeds BGR .* expects RGB with mean \[0\.5, 0\.5"):
        RevisitedDataset(**kwargs, mean=(0.5,) * 3, std=(0.5,) * 3)
    with pytest.raises(ProtocolError, match="expects BGR with mean"):  # BGR weights fed RGB-ordered statistics
        RevisitedDataset(**kwargs, mean=IMAGENET_RGB[0], std=IMAGENET_RGB[1], input_format="bgr")
    RevisitedDataset(bench, NAME, "query", mean=(0.5,) * 3, std=(0.5,) * 3, protocol="revisitop")  # the model's own


# ------------------------------------------------------------------------------ the dataset API
@pytest.mark.parametrize("protocol", ["superglobal", "revisitop"])
def test_dataset_crops_the_issue_box_per_protocol(bench, protocol):
    ds = RevisitedDataset(bench, NAME, "query", mean=IMAGENET_RGB[0], std=IMAGENET_RGB[1], protocol=protocol)
    expected = _coded(80, 100)[CROPS[protocol]]
    assert np.array_equal(ds.load(0), expected) and ds.image_sizes() == [(64, 80)]
    assert ds.protocol is EVAL_PROTOCOLS[protocol] and ds.describe()["eval_protocol"]["name"] == protocol


def test_extraction_refuses_a_protocol_the_dataset_was_not_made_for(bench):
    model = EmbeddingModel("resnet18", head="gem", embedding_dim=8)
    ds = RevisitedDataset(bench, NAME, "database", mean=model.mean, std=model.std, protocol="superglobal")
    with pytest.raises(ProtocolError, match="different evaluation protocols"):
        extract_all(model, ds, protocol="revisitop", progress=False)


def test_cache_key_holds_the_protocol(bench):
    ds = {p: RevisitedDataset(bench, NAME, "database", mean=None, std=None, protocol=p) for p in EVAL_PROTOCOLS}
    keys = {p: descriptor_key("fp", ds[p], p) for p in EVAL_PROTOCOLS}
    assert keys["superglobal"]["eval_protocol"] == SUPERGLOBAL.describe()
    assert keys["superglobal"] != keys["revisitop"]


# ------------------------------------------------------------------------------ evaluate.py
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    module = LandmarkRetrievalModule(num_classes=3, backbone="resnet18", head="gem+sgem", embedding_dim=16)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def _run(monkeypatch, args: list[str], out: Path) -> tuple[dict, list]:
    seen: list = []
    bind = evaluate.bind_protocol

    def spying_bind(model, protocol):
        _record_query_inputs(model, seen)
        return bind(model, protocol)

    monkeypatch.setattr(evaluate, "bind_protocol", spying_bind)
    assert evaluate.main([*args, "--device", "cpu", "--num-workers", "0", "--no-progress", "--json", str(out)]) == 0
    return json.loads(out.read_text())[NAME], seen


def test_evaluate_checkpoint_crops_per_protocol_records_it_and_never_reuses_descriptors(bench, checkpoint, tmp_path,
                                                                                       monkeypatch):
    cache = tmp_path / "cache"
    base = ["--checkpoint", str(checkpoint), "--data-root", str(bench), "--datasets", NAME, "--cache-dir", str(cache)]
    for protocol, args, entries in (("revisitop", [], 2), ("superglobal", ["--protocol", "superglobal"], 4)):
        result, seen = _run(monkeypatch, base + args, tmp_path / f"{protocol}.json")
        assert result["eval_protocol"] == EVAL_PROTOCOLS[protocol].describe()  # --checkpoint default: revisitop
        assert len(seen) == 1  # the query at scale 1: extracted, not taken from the other protocol's cache
        torch.testing.assert_close(seen[0][0], _expected_input(protocol, "rgb", *IMAGENET_RGB))
        assert len(list(cache.glob("*.npy"))) == entries
        assert {json.loads(p.read_text())["key"]["eval_protocol"]["name"] for p in cache.glob("*.json")} == (
            {"revisitop"} if protocol == "revisitop" else {"revisitop", "superglobal"})
    result, _ = _run(monkeypatch, base + ["--scales", "1.0"], tmp_path / "custom.json")
    assert (result["eval_protocol"]["name"], result["eval_protocol"]["base"]) == ("custom", "revisitop")


def test_cvnet_weights_default_to_the_superglobal_protocol(bench, tmp_path, monkeypatch):
    weights = tmp_path / "cvnet_r50.pyth"
    random_cvnet_checkpoint(weights)
    args = ["--cvnet-weights", str(weights), "--depth", "50", "--data-root", str(bench), "--datasets", NAME,
            "--rgem", "--gemp", "--sgem", "--relu-plus"]
    assert evaluate.protocol_of(evaluate.build_parser().parse_args(args)) is SUPERGLOBAL
    result, seen = _run(monkeypatch, args, tmp_path / "cvnet.json")
    assert result["eval_protocol"] == SUPERGLOBAL.describe()
    assert len(seen) == 1  # BGR, CVNet's constants, the int() crop: the tensor SuperGlobal's loader makes
    torch.testing.assert_close(seen[0][0], _expected_input("superglobal", "bgr", CVNET_MEAN_BGR, CVNET_STD_BGR))


# ------------------------------------------------------------------------------ the callback
def test_callback_crops_per_protocol_and_records_it_in_results(bench, synthetic_data, tmp_path):
    datamodule = GLDv2DataModule(str(synthetic_data / "gldv2"), csv="train.csv", image_size=64, batch_size=8,
                                 num_workers=0, val_fraction=0.0)
    callback = RetrievalEvalCallback(data_root=str(bench), datasets=[NAME], protocol="superglobal", rerank=False,
                                     batch_size=4, num_workers=0, progress=False)
    module = LandmarkRetrievalModule(num_classes=datamodule.num_classes, backbone="resnet18", head="gem+sgem",
                                     embedding_dim=16)
    seen: list = []
    _record_query_inputs(module.model, seen)
    trainer = pl.Trainer(accelerator="cpu", logger=False, callbacks=[callback], default_root_dir=tmp_path,
                         max_epochs=1, limit_train_batches=1, enable_progress_bar=False, enable_checkpointing=False)
    trainer.fit(module, datamodule)
    queries = callback._datasets[NAME][0]
    assert np.array_equal(queries.load(0), _coded(80, 100)[CROPS["superglobal"]])
    torch.testing.assert_close(seen[-1][0], _expected_input("superglobal", module.model.input_format,
                                                            module.model.mean, module.model.std))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["version"] == 4 and results["trained"]["eval_protocol"] == SUPERGLOBAL.describe()
    assert RetrievalEvalCallback(data_root=str(bench), datasets=[NAME]).protocol is REVISITOP  # the default
    with pytest.raises(ProtocolError, match="valid"):
        RetrievalEvalCallback(data_root=str(bench), datasets=[NAME], protocol="superglobl")
