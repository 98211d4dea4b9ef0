"""--device of every command (embed, search, evaluate, mining): one check, before any work."""
from __future__ import annotations

import pytest
import torch

import evaluate
from sg_train import embed, search
from sg_train.devices import resolve_device
from sg_train.errors import OptionError


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("name, message", [
    ("foo", "'foo' is not a device: use cpu, cuda or cuda:N"), ("meta", "'meta': use cpu or cuda"),
    ("cuda", "this machine has no CUDA device; use --device cpu"), ("cuda:7", "no CUDA device"),
])
def test_a_device_that_cannot_work_is_named(name, message):
    with pytest.raises(OptionError, match=message):
        resolve_device(name)


def test_no_device_is_cuda_when_there_is_one_else_cpu():
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("command, args", [
    (embed.main, ["no-such.ckpt", "no-such-folder", "--out", "out"]),
    (search.main, ["no-such.jpg", "--index", "no-such-index"]),
    (evaluate.main, ["--checkpoint", "no-such.ckpt", "--data-root", "no-such-root", "--datasets", "x"]),
])
def test_every_command_names_a_bad_device_before_reading_anything(command, args, capsys):
    """Every other input here is missing too: the device is what the one line names."""
    assert command([*args, "--device", "foo"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'foo' is not a device" in err


def test_search_names_a_top_k_of_zero_before_opening_the_index(capsys):
    assert search.main(["no-such.jpg", "--index", "no-such-index", "--top-k", "0"]) == 1
    assert "--top-k and --batch-size must be >= 1, got 0 and 32" in capsys.readouterr().err
