"""python -m sg_train.export: TorchScript and ONNX graphs equal the eager multi-scale extraction at image
sizes other than the one they were traced at; CVNet weights read back by sg_train.cvnet give the same
descriptors; every bad input is refused naming the culprit."""
from __future__ import annotations

import copy
import json

import onnx
import onnxruntime
import pytest

from sg_train.eval_protocols import get_protocol
import torch
from torch import nn

from sg_train.cvnet import CVNET_MEAN_BGR, CVNET_STD_BGR, cvnet_pool_p, load_cvnet_weights
from sg_train.errors import OptionError
from sg_train.export import (
    FILE_NAMES,
    MAX_CHECK_SIDE,
    PARITY_TOLERANCE,
    SIDECAR_NAME,
    ExportError,
    _resize_traceable,
    example_size,
    export_model,
    main,
)
from sg_train.inference import model_from_checkpoint
from sg_train.model import EmbeddingModel, resize_for_scale
from sg_train.weights_io import MODEL_PREFIX, WeightsMismatchError, write_checkpoint_record

SUPERGLOBAL_SCALES = (0.7071, 1.0, 1.4142)
# Sizes other than the traced ones (example_size: 91 x 136 for the GeM model, 182 x 227 with R-GeM); at
# 64 x 80 a ResNet's last map is 2 x 2, 2 x 3 and 3 x 4 at the three scales: R-GeM replicates, then reflects.
SIZES = [(2, 64, 80), (2, 72, 56), (1, 97, 130)]


def randomise_batch_norm(model: nn.Module) -> None:
    """BatchNorm statistics away from identity, so that a wrong channel order or padding shows."""
    generator = torch.Generator().manual_seed(3)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in ((module.weight, 0.5, 1.5), (module.bias, -0.3, 0.3),
                                      (module.running_mean, -0.2, 0.2), (module.running_var, 0.5, 1.5)):
                tensor.data.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))


def write_checkpoint(model: EmbeddingModel, path) -> None:
    """What train.py's checkpoints hold for the model: its weights under ``model.`` and the record."""
    checkpoint = {"state_dict": {MODEL_PREFIX + k: v for k, v in model.state_dict().items()}}
    write_checkpoint_record(checkpoint, model_config=model.config, landmark_ids=None, protocol=None)
    torch.save(checkpoint, path)


def images(batch, height, width, seed=5):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def gem_checkpoint(tmp_path_factory):
    model = EmbeddingModel("resnet18", "gem", 16, gem_p=2.6, scales=(0.7071, 1.0))
    randomise_batch_norm(model)
    path = tmp_path_factory.mktemp("gem") / "model.ckpt"
    write_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def gem_export(gem_checkpoint, tmp_path_factory):
    """The command line on a GeM checkpoint, default formats (a ResNet-18: no CVNet weights) and
    scales (the revisitop protocol's, as evaluation and load_model extract; the model's own are 0.7071, 1)."""
    out = tmp_path_factory.mktemp("gem-export")
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(out)]) == 0
    return model_from_checkpoint(gem_checkpoint, scales=get_protocol("revisitop").scales), out


@pytest.fixture(scope="module")
def superglobal_export(tmp_path_factory):
    """SuperGlobal's setting (ReLU+, R-GeM, GeM+, Scale-GeM max at its scales), through the API."""
    model = EmbeddingModel("resnet18", "rgem+gemp+sgem", 16, scales=SUPERGLOBAL_SCALES, sgem="max", relu_plus=True).eval()
    randomise_batch_norm(model)
    out = tmp_path_factory.mktemp("superglobal-export")
    export_model(model, out, ["torchscript", "onnx"])
    return model, out


def run_torchscript(out):
    module = torch.jit.load(str(out / FILE_NAMES["torchscript"]))
    return lambda x: module(x)


def run_onnx(out):
    session = onnxruntime.InferenceSession(str(out / FILE_NAMES["onnx"]), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(["descriptors"], {"images": x.numpy()})[0])


@pytest.mark.parametrize("runner", [run_torchscript, run_onnx], ids=["torchscript", "onnx"])
@pytest.mark.parametrize("which", ["gem_export", "superglobal_export"])
def test_exported_graphs_equal_the_eager_extraction_at_other_sizes(request, which, runner):
    model, out = request.getfixturevalue(which)
    run = runner(out)
    for batch, height, width in SIZES:
        x = images(batch, height, width)
        with torch.no_grad():
            expected = model.extract(x)
            got = run(x)
        assert got.shape == expected.shape == (batch, 16)
        diff = float((got - expected).abs().max())
        print(f"{which} {runner.__name__[4:]} {batch}x3x{height}x{width}: max abs diff {diff:.2e}")
        assert diff <= PARITY_TOLERANCE
        assert torch.allclose(got.norm(dim=1), torch.ones(batch), atol=1e-5)


def test_the_graphs_resize_is_the_models():
    """int(h*s) sizes (338 px at 1.4142 gives 477, not 478), at least 1 px, bilinear, antialias; s = 1
    unchanged: eager and compiled by TorchScript (torch.export's use is covered by the ONNX parity)."""
    scripted = torch.jit.script(_resize_traceable)
    for height, width in [(64, 80), (72, 56), (338, 101), (1, 3)]:
        x = images(1, height, width)
        for scale in (0.25, 0.5, 0.7071, 1.0, 1.4142, 2.0):
            expected = resize_for_scale(x, scale)
            assert torch.equal(_resize_traceable(x, scale), expected) and torch.equal(scripted(x, scale), expected)


def test_sidecar_and_embedded_preprocessing(gem_export, gem_checkpoint):
    model, out = gem_export
    record = json.loads((out / SIDECAR_NAME).read_text())
    preprocessing = {"input_format": "rgb", "scale": 1 / 255, "mean": list(model.mean), "std": list(model.std),
                     "scales": list(get_protocol("revisitop").scales), "embedding_dim": 16}
    assert record["preprocessing"] == preprocessing
    assert record["source"] == str(gem_checkpoint) and record["model"] == model.config
    assert record["traced_at"] == list(example_size(model)) == [91, 136]
    assert sorted(record["files"]) == ["onnx", "torchscript"]
    assert "resnet18" in record["not_written"]["cvnet"]
    for entry in record["files"].values():
        assert max(entry["max_abs_difference"].values()) <= PARITY_TOLERANCE

    proto = onnx.load(str(out / FILE_NAMES["onnx"]))
    assert {p.key: json.loads(p.value) for p in proto.metadata_props} == preprocessing
    assert max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")) == 18
    resize = [node for node in proto.graph.node if node.op_type == "Resize"]
    assert resize and all(a.i == 1 for n in resize for a in n.attribute if a.name == "antialias")
    height, width = (d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim[2:])
    assert isinstance(height, str) and isinstance(width, str)  # symbolic, not the traced 91 x 136

    extra = {"preprocessing.json": ""}
    torch.jit.load(str(out / FILE_NAMES["torchscript"]), _extra_files=extra)
    assert json.loads(extra["preprocessing.json"]) == preprocessing


def test_opsets_the_exporter_cannot_write_are_refused(gem_checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(tmp_path), "--opset", "17"]) == 1
    err = capsys.readouterr().err
    assert "opset 17" in err and "--opset 18" in err and "antialias" in err
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(tmp_path), "--opset", "99"]) == 1
    assert "opset 99 is newer than the installed onnx" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# --- CVNet weights --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet50():
    model = EmbeddingModel("resnet50", "gem", 64, gem_p=2.7).eval()
    randomise_batch_norm(model)
    with torch.no_grad():
        model.fc.bias.normal_(std=0.05, generator=torch.Generator().manual_seed(4))
    return model


def test_cvnet_weights_round_trip(resnet50, tmp_path):
    path = tmp_path / FILE_NAMES["cvnet"]
    for stale in (path, tmp_path / SIDECAR_NAME):
        stale.write_text("an earlier export")
    record = export_model(resnet50, tmp_path, ["cvnet"], size=(64, 64), overwrite=True)
    state = torch.load(path, weights_only=True)["model_state"]
    assert all(key.startswith("encoder_q.") for key in state)
    assert state["encoder_q.head.pool.p"].item() == pytest.approx(2.7)
    assert state["encoder_q.head.fc.weight"].shape == (64, 2048)
    assert torch.equal(state["encoder_q.stem.conv.weight"], resnet50.backbone.conv1.weight.flip(1))
    entry = json.loads((tmp_path / SIDECAR_NAME).read_text())["files"]["cvnet"]
    assert entry == record["files"]["cvnet"]
    assert entry["superglobal"]["MODEL.HEADS.REDUCTION_DIM"] == 64 and entry["head_pool_p"] == pytest.approx(2.7)

    reloaded = load_cvnet_weights(path, 50, head="gem")
    assert reloaded.input_format == "bgr" and reloaded.mean == CVNET_MEAN_BGR and reloaded.std == CVNET_STD_BGR
    rgb = images(1, 64, 64)
    with torch.no_grad():
        ours, theirs = resnet50.extract(rgb), reloaded.extract(rgb.flip(1))  # the same pixels, BGR
        unpermuted = reloaded.extract(rgb)
    diff = float((ours - theirs).abs().max())
    print(f"cvnet round trip 1x3x64x64: max abs diff {diff:.2e}")
    assert diff <= 1e-5
    assert float((ours - unpermuted).abs().max()) > 1e-3  # the channel order matters at this tolerance

    with pytest.raises(ExportError, match=r"cvnet.pyth.*export.json.*--overwrite"):
        export_model(resnet50, tmp_path, ["cvnet"], size=(64, 64))


def test_cvnet_refuses_colours_it_cannot_express(tmp_path):
    # RGB input with the statistics in BGR order: a permutation of CVNet's numbers, but not of its colours.
    model = EmbeddingModel("resnet50", "gem", 8, mean=CVNET_MEAN_BGR, std=CVNET_STD_BGR)
    with pytest.raises(WeightsMismatchError, match=r"RGB.*mean \[0.406, 0.456, 0.485\].*only the channel order"):
        export_model(model, tmp_path, ["cvnet"])
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("head, p, meaning", [
    ("gem", 2.6, "trained"), ("gemp", 4.6, "fixed p"), ("avg", 1.0, "average"), ("max", 3.0, "no GeM p"),
])
def test_cvnet_pool_p_says_what_it_is(head, p, meaning):
    model = EmbeddingModel("resnet18", head, 8, gem_p=2.6)
    value, text = cvnet_pool_p(model)
    assert value == pytest.approx(p) and meaning in text


# --- bad input --------------------------------------------------------------------------------
def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nope.ckpt"
    assert main(["--checkpoint", str(missing), "--out", str(tmp_path / "out")]) == 1
    assert str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_overwrite(gem_export, gem_checkpoint, capsys):
    _, out = gem_export
    onnx_file = out / FILE_NAMES["onnx"]
    before = onnx_file.read_bytes()
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(out), "--formats", "onnx"]) == 1
    err = capsys.readouterr().err
    assert str(onnx_file) in err and "--overwrite" in err
    assert onnx_file.read_bytes() == before


def test_cvnet_needs_a_resnet50_or_101(gem_checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(tmp_path), "--formats", "cvnet"]) == 1
    err = capsys.readouterr().err
    assert "'resnet18'" in err and "resnet50, resnet101" in err
    assert not any(tmp_path.iterdir())


def test_unsupported_format(gem_checkpoint, tmp_path, capsys):
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(tmp_path), "--formats", "onnx", "tflite"]) == 1
    err = capsys.readouterr().err
    assert "'tflite'" in err and "torchscript, onnx, cvnet" in err
    with pytest.raises(OptionError, match="tflite"):
        export_model(EmbeddingModel("resnet18", "gem", 8), tmp_path, ["tflite"])
    assert not any(tmp_path.iterdir())


def test_a_file_that_differs_from_the_model_is_not_written(tmp_path, monkeypatch):
    """The read-back check: here the traced graph is of a model whose FC bias moved by 1e-2."""
    import sg_train.export as export

    model = EmbeddingModel("resnet18", "gem", 8).eval()
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved.fc.bias.add_(1e-2)
    real = export.torchscript_module
    monkeypatch.setattr(export, "torchscript_module", lambda _, size: real(moved, size=size))
    with pytest.raises(ExportError, match=r"TorchScript export does not reproduce the model.*nothing was written"):
        export_model(model, tmp_path, ["torchscript"], size=(64, 80))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("under", [False, True], ids=["a-file", "inside-a-file"])
def test_an_out_that_is_a_file_or_inside_one_is_refused_before_any_work(gem_checkpoint, tmp_path, capsys, under):
    existing = tmp_path / "model.onnx"
    existing.write_text("keep me")
    out = existing / "exported" if under else existing
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    why = f"is inside {existing}, which is a file, not a folder" if under else "is a file, not a folder"
    assert err.count("\n") == 1 and f"--out {out} {why}; choose a folder" in err
    assert existing.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [existing]


@pytest.mark.parametrize("scales, culprit", [
    (["1", "1"], "1.0 more than once"), (["0.7071", "1", "0.7071"], "0.7071 more than once"), (["1", "0"], "0.0"),
    (["1", "-1"], "-1.0"), (["1", "nan"], "nan"), (["inf"], "inf"),
    (["1", "1000"], "from 0.0625 (1/16) to 4, not 1000.0"), (["1e-9"], "not 1e-09"),
])
def test_repeated_or_non_positive_scales_are_refused(gem_checkpoint, tmp_path, capsys, scales, culprit):
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(tmp_path), "--scales", *scales]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--scales" in err and culprit in err
    assert not any(tmp_path.iterdir())


def test_scales_that_would_make_the_check_image_too_large_are_refused(gem_checkpoint, tmp_path, capsys):
    """The check image is sized for the smallest scale (example_size: 1024 x 1536 px at 1/16, the
    smallest scale check_scales allows, for a ResNet's 32 px stride without R-GeM); the largest scale
    then runs the model on more than MAX_CHECK_SIDE px a side."""
    assert main(["--checkpoint", str(gem_checkpoint), "--out", str(tmp_path), "--scales", "0.0625", "2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--scales" in err and "1024 x 1536" in err and "3072 px a side at scale 2" in err
    assert str(MAX_CHECK_SIDE) in err
    with pytest.raises(OptionError, match=r"2560 px a side as is"):  # R-GeM at 1/16 alone: the input is that large
        export_model(EmbeddingModel("resnet18", "rgem+gem", 8, scales=(0.0625,)), tmp_path)
    with pytest.raises(OptionError, match=r"512 x 640 .*at scale 4"):  # R-GeM: 640 px x 4 > 2048
        export_model(EmbeddingModel("resnet18", "rgem+gem", 8, scales=(0.25, 4.0)), tmp_path)
    with pytest.raises(OptionError, match=r"3000 x 64 px images \(the size asked for\).*trace at a smaller size"):
        export_model(EmbeddingModel("resnet18", "gem", 8), tmp_path, size=(3000, 64))
    assert not any(tmp_path.iterdir())
