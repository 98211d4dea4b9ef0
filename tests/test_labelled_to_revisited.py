"""A labelled folder as a Revisited benchmark that evaluate.py reads (leave-one-out by junk)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from datamodules.labelled import LabelledImagesDataModule
from datamodules.labelled_to_revisited import main
from datamodules.revisited import RevisitedDataset
from sg_train.retrieval import load_gnd
from test_labelled_data import folder, photo, write_csv


def test_held_out_photos_become_a_revisited_benchmark(tmp_path, capsys):
    photos = folder(tmp_path / "My Photos", {"Café de Flore": 6, "Big Ben": 5, "Solo": 1})
    assert main(["--images", str(photos), "--out", str(tmp_path / "rev"), "--name", "mine"]) == 0
    gnd = load_gnd(tmp_path / "rev" / "mine" / "gnd_mine.pkl")
    assert len(gnd["imlist"]) == 4 and len(gnd["qimlist"]) == 4  # 2 held out of each class of 5-6, none of Solo
    for q, entry in enumerate(gnd["gnd"]):
        own = gnd["imlist"].index(gnd["qimlist"][q])
        assert entry["junk"] == [own] and len(entry["easy"]) == 1 and own not in entry["easy"]
        assert entry["bbx"] == [0.0, 0.0, 40.0, 30.0]  # the whole photo
    table = (tmp_path / "rev" / "mine" / "images.tsv").read_text(encoding="utf-8").splitlines()
    assert table[0] == "imname\tpath\tclass" and any("\tCafé de Flore" in line for line in table[1:])
    held = {Path(line.split("\t")[1]).name for line in table[1:]}
    split_files = list((photos / ".sg-train").glob("held_out_*.json"))
    assert len(split_files) == 1  # the very split file training uses
    queries = RevisitedDataset(tmp_path / "rev", "mine", "query", mean=None, std=None)
    assert len(queries) == 4 and queries[0][0].shape == (3, 30, 40)
    assert held and main(["--images", str(photos), "--out", str(tmp_path / "rev"), "--name", "mine"]) == 2
    assert "exists; choose another --name or --out, or pass --overwrite" in capsys.readouterr().err


def test_csv_roles_and_boxes_carry_over(tmp_path):
    for k in range(4):
        photo(tmp_path / f"{k}.png", seed=k, size=(50, 40))
    csv = write_csv(tmp_path / "df.csv", "path,label,split,is_query,is_gallery,x_1,y_1,x_2,y_2", [
        "0.png,a,validation,1,1,5,5,25,35", "1.png,a,validation,0,1,,,,", "2.png,b,validation,1,1,,,,",
        "3.png,b,train,0,0,,,,"])
    assert main(["--csv", str(csv), "--out", str(tmp_path / "rev"), "--name", "csv", "--copy"]) == 0
    gnd = load_gnd(tmp_path / "rev" / "csv" / "gnd_csv.pkl")
    assert gnd["qimlist"] == ["000000"]  # 2.png has no other image of b among the validation rows
    assert gnd["gnd"][0]["bbx"] == [5.0, 5.0, 25.0, 35.0] and gnd["gnd"][0]["easy"] == [1]
    assert not (tmp_path / "rev" / "csv" / "jpg" / "000000.jpg").is_symlink()


def test_nothing_to_query_is_an_error(tmp_path, capsys):
    photos = folder(tmp_path / "p", {"A": 1, "B": 1})
    assert main(["--images", str(photos), "--out", str(tmp_path / "rev"), "--name", "x", "--all"]) == 2
    assert "no query has another image of its class" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--images", str(photos), "--out", str(tmp_path / "rev")])


def test_a_runs_checkpoint_gives_its_split_and_other_photos_are_refused(tmp_path, capsys):
    """--checkpoint takes the run's held-out split (here 0.4, not the default 0.2) and refuses photos
    other than the ones that run held out; the help text is the whole first paragraph."""
    photos = folder(tmp_path / "My Photos", {"Café de Flore": 10, "Big Ben": 10})
    run = LabelledImagesDataModule(images=str(photos), val_fraction=0.4, seed=3)
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"datamodule_hyper_parameters": dict(run.hparams), type(run).__qualname__: run.state_dict()}, checkpoint)
    out = ["--images", str(photos), "--out", str(tmp_path / "rev")]
    assert main([*out, "--name", "run", "--checkpoint", str(checkpoint)]) == 0
    assert len(load_gnd(tmp_path / "rev" / "run" / "gnd_run.pkl")["imlist"]) == int(run.held_out.sum()) == 8
    assert "the held-out photos of " + run.split_file in capsys.readouterr().out
    assert main([*out, "--name", "x", "--checkpoint", str(checkpoint), "--val-fraction", "0.2"]) == 2
    assert "--checkpoint sets the held-out split; leave out --val-fraction" in capsys.readouterr().err
    Path(run.data.path(int(run.held_out.nonzero()[0][0]))).unlink()  # a held-out photo removed since: a photo
    assert main([*out, "--name", "y", "--checkpoint", str(checkpoint)]) == 2
    assert "the held-out photos differ from the checkpoint's" in capsys.readouterr().err  # the run trained on
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    assert main([*out, "--name", "z", "--checkpoint", str(tmp_path / "other.ckpt")]) == 2
    assert "is not of a run on labelled photos" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "R1M distractors) can score a model on them." in " ".join(capsys.readouterr().out.split())
