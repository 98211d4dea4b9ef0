"""Loss and model options of the wrong type (YAML strings such as ``s: "30"``) are refused at
construction, naming the owner, the key, the value and its type, and the line to write instead."""
from __future__ import annotations

import pytest

from sg_train.losses import build_loss
from sg_train.options import check_option_types
from sg_train.model import EmbeddingModel
from sg_train.module import LandmarkRetrievalModule


def test_string_scale_in_loss_options_names_loss_key_value_and_fix():
    with pytest.raises(ValueError) as err:
        LandmarkRetrievalModule(num_classes=3, backbone="resnet18", embedding_dim=8, loss_options={"s": "30"})
    assert str(err.value) == "loss 'arcface' option 's' must be a number, got '30' (str); write s: 30.0"


@pytest.mark.parametrize(
    "loss, options, message",
    [
        ("cosface", {"m": "0.35"}, "loss 'cosface' option 'm' must be a number, got '0.35' (str); write m: 0.35"),
        ("subcenter_arcface", {"k": 3.0}, "option 'k' must be an integer, got 3.0 (float); write k: 3"),
        ("arcface", {"k": "2"}, "option 'k' must be an integer, got '2' (str); write k: 2"),
        ("madacos", {"gather": "false"},
         "option 'gather' must be true or false, got 'false' (str); write gather: false"),
        ("madacos", {"rho": None}, "option 'rho' must be a number, got None (NoneType); write rho: 0.02 (the default)"),
        ("curricularface", {"s": True}, "option 's' must be a number, got True (bool)"),
        ("dynamic_arcface", {"a": [0.45]}, "loss 'dynamic_arcface' option 'a' must be a number, got [0.45] (list)"),
    ],
)
def test_loss_option_types(loss, options, message):
    with pytest.raises(ValueError) as err:
        build_loss(loss, embedding_dim=4, num_classes=3, class_counts=[1, 2, 3], **options)
    assert message in str(err.value)


def test_well_typed_loss_options_still_build():
    loss = build_loss("arcface", embedding_dim=4, num_classes=3, s=30, m=0.2, k=2)  # an int for a float is fine
    assert (loss.s, loss.m, loss.k) == (30.0, 0.2, 2)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"gem_p": "3"}, "model option 'gem_p' must be a number, got '3' (str); write gem_p: 3.0"),
        ({"gemp_p": "x"}, "model option 'gemp_p' must be a number, got 'x' (str); write gemp_p: 4.6 (the default)"),
        ({"rgem_kernel": 5.0}, "model option 'rgem_kernel' must be an integer, got 5.0 (float); write rgem_kernel: 5"),
        ({"scales": "0.7071, 1, 1.4142"},
         "model option 'scales' must be a list of numbers, got '0.7071, 1, 1.4142' (str); "
         "write scales: [0.7071, 1.0, 1.4142]"),
        ({"sgem_p": "10"}, "model option 'sgem_p' must be a number, got '10' (str); write sgem_p: 10.0"),
        ({"sgem": "Max"}, "model option 'sgem' must be one of 'max', 'finite', got 'Max' (str)"),
        ({"mean": "0.5"}, "model option 'mean' must be a list of numbers or null, got '0.5' (str)"),
    ],
)
def test_model_options_are_checked_before_anything_is_built(options, message):
    with pytest.raises(ValueError) as err:
        LandmarkRetrievalModule(num_classes=3, backbone="resnet18", embedding_dim=8, model_options=options)
    assert message in str(err.value)


def test_embedding_model_arguments_are_checked_too():
    with pytest.raises(ValueError, match=r"model option 'relu_plus' must be true or false, got 'yes' \(str\); "
                                         r"write relu_plus: true"):
        EmbeddingModel("resnet18", "gem", 8, relu_plus="yes")


def test_well_typed_model_options_still_build():
    model = EmbeddingModel("resnet18", "rgem+gem+sgem", 8, gem_p=3, rgem_kernel=3, scales=[0.5, 1], std=(1, 1, 1))
    assert model.scales == (0.5, 1.0) and model.std == (1.0, 1.0, 1.0)


def test_check_option_types_ignores_keys_and_annotations_it_does_not_know():
    def f(a: float, b: object = None, c: "list[int] | None" = None) -> None: ...

    check_option_types("thing", f, {"a": 1, "b": "anything", "c": [1, 2], "zzz": "not a parameter"})
    with pytest.raises(ValueError, match=r"thing option 'c' must be a list of integers or null, got \[1, 2.5\]"):
        check_option_types("thing", f, {"c": [1, 2.5]})
