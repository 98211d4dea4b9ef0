"""A warm-up longer than the run, or a run of no steps, is an error naming model.warmup and the fix."""
from __future__ import annotations

import math

import pytest

from sg_train.module import LandmarkRetrievalModule
from sg_train.optim import resolve_warmup_steps


def test_warmup_longer_than_the_run_is_refused_not_capped():
    with pytest.raises(ValueError) as err:
        resolve_warmup_steps(500, 200)
    assert str(err.value) == (
        "model.warmup = 500 steps is longer than the run, which has 200 optimizer steps; "
        "write a fraction of the run below 1 (e.g. warmup: 0.05) or at most 200 steps")


def test_the_module_refuses_it_when_building_the_schedule():
    module = LandmarkRetrievalModule(num_classes=2, backbone="resnet18", embedding_dim=8, warmup=50)
    with pytest.raises(ValueError, match=r"model.warmup = 50 steps is longer than the run, which has 10"):
        module.build_optimizer(total_steps=10)
    assert module.build_optimizer(total_steps=50)["lr_scheduler"]["scheduler"] is not None  # exactly the run: fine


@pytest.mark.parametrize(
    "warmup, message",
    [
        (1.5, r"model.warmup = 1.5 is neither a fraction of the run \(< 1\) nor a whole number of steps; "
              r"write warmup: 1 \(steps\)"),
        (math.nan, r"model.warmup must be >= 0 .*got nan"),
        (-0.1, r"model.warmup must be >= 0 .*got -0.1; e.g. write warmup: 0.05"),
    ],
)
def test_bad_warmup_values(warmup, message):
    with pytest.raises(ValueError, match=message):
        resolve_warmup_steps(warmup, 100)


def test_a_run_without_steps_is_named_before_the_schedule():
    with pytest.raises(ValueError, match=r"the run has 0 optimizer steps.*trainer.max_epochs or trainer.max_steps"):
        resolve_warmup_steps(0.05, 0)
