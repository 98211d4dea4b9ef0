import math

import pytest
import torch
from torch import nn

from sg_train.optim import (
    apply_lr_multipliers,
    parameter_groups,
    resolve_warmup_steps,
    warmup_cosine_factor,
    warmup_cosine_schedule,
)


def test_warmup_is_linear_then_cosine_reaches_the_floor():
    factors = [warmup_cosine_factor(s, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for s in range(15)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    # Halfway through the cosine (step 9 of 4..14): r + (1 - r) / 2.
    assert factors[9] == pytest.approx(0.1 + 0.9 * 0.5)
    assert factors[14] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_cosine_without_warmup_starts_at_one():
    assert warmup_cosine_factor(0, 0, 10) == pytest.approx(1.0)
    assert warmup_cosine_factor(5, 0, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))


def test_warmup_fraction_and_count():
    assert resolve_warmup_steps(0.1, 200) == 20
    assert resolve_warmup_steps(30, 200) == 30
    assert resolve_warmup_steps(200, 200) == 200
    with pytest.raises(ValueError, match="warmup"):
        resolve_warmup_steps(-1, 100)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.p = nn.Parameter(torch.ones(1) * 3)  # like GeM's p
        self.fc = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_parameter_groups_keep_norms_biases_and_gem_p_out_of_weight_decay():
    toy = _Toy()
    groups = parameter_groups({"backbone": (toy.named_parameters(), 0.1)})
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay"}
    decayed = {id(p) for p in by_name["backbone"]["params"]}
    kept = {id(p) for p in by_name["backbone_no_decay"]["params"]}
    assert decayed == {id(toy.conv.weight), id(toy.fc.weight)}
    assert kept == {id(toy.conv.bias), id(toy.bn.weight), id(toy.bn.bias), id(toy.p), id(toy.fc.bias)}
    assert by_name["backbone_no_decay"]["weight_decay"] == 0.0
    assert "weight_decay" not in by_name["backbone"]


def test_lr_multipliers_and_schedule_scale_each_group():
    toy = _Toy()
    groups = parameter_groups({"backbone": (toy.conv.named_parameters(), 0.1), "head": (toy.fc.named_parameters(), 1.0)})
    optimizer = torch.optim.SGD(groups, lr=1.0, weight_decay=1e-4)
    apply_lr_multipliers(optimizer)
    scheduler = warmup_cosine_schedule(optimizer, warmup_steps=2, total_steps=10)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(0.05) and lrs["head"] == pytest.approx(0.5)
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    optimizer.step()
    scheduler.step()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(0.1) and lrs["head_no_decay"] == pytest.approx(1.0)


def test_schedule_rejects_bad_settings():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_cosine_schedule(optimizer, 0, 0)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        warmup_cosine_schedule(optimizer, 0, 10, min_lr_ratio=2.0)
