"""python -m sg_train.embed (resumable folder embedding) and python -m sg_train.search."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from child_env import child_env
from sg_train import embed, search
from sg_train.embed import EmbedOutputError, Embeddings, collect_images, embed_files
from sg_train.embedder import Embedder, load_model
from sg_train.errors import UserInputError
from test_embedder import write_checkpoint

CHUNK = 2  # files per chunk: the 9 gallery files make 5 chunks


class Interrupted(Exception):
    """Stands for a run stopped after a chunk."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt")


@pytest.fixture(scope="module")
def embedder(checkpoint) -> Embedder:
    return load_model(checkpoint)


@pytest.fixture(scope="module")
def gallery(tiny_benchmark, tmp_path_factory) -> Path:
    """6 benchmark images, two more under a sub-folder with spaces and accents (one with an upper-case
    extension), a non-image file and an image that cannot be read."""
    root = tmp_path_factory.mktemp("gallery") / "my photos"
    nested = root / "sub dir" / "été 2024"
    nested.mkdir(parents=True)
    images = [p for p in sorted((tiny_benchmark / "rsynth" / "jpg").glob("*.jpg")) if "query" not in p.name][::2]
    for image in images[:6]:
        shutil.copy(image, root / image.name)
    shutil.copy(images[6], nested / "Ça va — café.JPG")
    shutil.copy(images[7], nested / "z.jpeg")
    (root / "notes.txt").write_text("not an image")
    (root / "broken.jpg").write_bytes(images[0].read_bytes()[:300])
    return root


@pytest.fixture(scope="module")
def files(gallery) -> list[str]:
    return collect_images([gallery], recursive=True).files


@pytest.fixture(scope="module")
def reference(embedder, files, tmp_path_factory) -> Embeddings:
    """An uninterrupted embedding of the gallery."""
    return embed_files(embedder, files, tmp_path_factory.mktemp("reference") / "out", chunk_size=CHUNK, progress=False)


def interrupt_after(chunk: int):
    def hook(c: int) -> None:
        if c == chunk:
            raise Interrupted
    return hook


def test_collect_images_takes_image_extensions_in_any_case_sorted_and_counts_the_rest(gallery):
    top = collect_images([gallery])
    assert len(top.files) == 7 and top.files == sorted(top.files)  # 6 + broken.jpg; not the sub-folder
    assert top.non_images == {".txt": 1}
    deep = collect_images([gallery, gallery / "broken.jpg", gallery / "notes.txt"], recursive=True)
    assert deep.files[:-1] == sorted(deep.files[:-1]) and Path(deep.files[-1]).name == "notes.txt"
    assert {"Ça va — café.JPG", "z.jpeg"} < {Path(f).name for f in deep.files}
    assert len(deep.files) == 10 and deep.duplicates == 1  # broken.jpg named twice; notes.txt asked for
    with pytest.raises(FileNotFoundError, match="input not found: .*nowhere"):
        collect_images([gallery / "nowhere"])


def test_collect_images_follows_linked_folders_and_leaves_hidden_files_out(gallery, tmp_path):
    """As the class-folder reader does: a linked folder is part of the tree, sg-train's .sg-train/ is not."""
    root = tmp_path / "photos"
    (root / ".sg-train").mkdir(parents=True)
    (root / ".sg-train" / "held_out.json").write_text("{}")
    (root / ".DS_Store").write_bytes(b"\0")
    (root / "linked").symlink_to(gallery / "sub dir", target_is_directory=True)
    found = collect_images([root], recursive=True)
    assert sorted(Path(f).name for f in found.files) == ["z.jpeg", "Ça va — café.JPG"]
    assert found.non_images == {}


def test_the_cli_writes_descriptors_file_list_skipped_images_and_record(checkpoint, embedder, gallery, files,
                                                                       reference, tmp_path, capsys):
    out = tmp_path / "out dir ü"
    argv = [str(checkpoint), str(gallery), "--out", str(out), "--recursive", "--chunk-size", str(CHUNK),
            "--no-progress"]
    assert embed.main(argv) == 0
    message = capsys.readouterr().out
    assert "embedded 8 images" in message and "1 unreadable" in message
    assert "1 non-image files left out (.txt: 1)" in message

    readable = [f for f in files if not f.endswith("broken.jpg")]
    lines = (out / "files.txt").read_bytes().decode("utf-8").split("\n")
    assert lines[:-1] == readable and lines[-1] == ""
    assert any(f.endswith("/sub dir/été 2024/Ça va — café.JPG") for f in lines)
    descriptors = np.load(out / "descriptors.npy")
    assert descriptors.dtype == np.float32 and descriptors.shape == (8, 32)
    np.testing.assert_array_equal(descriptors, reference.descriptors)  # the same command in Python
    np.testing.assert_allclose(descriptors, embedder.embed(readable), rtol=0, atol=1e-6)
    skipped = (out / "skipped.tsv").read_text(encoding="utf-8").splitlines()
    assert len(skipped) == 2 and skipped[0] == "path\treason"
    assert skipped[1].startswith(str(gallery / "broken.jpg") + "\t")
    record = json.loads((out / "embed.json").read_text(encoding="utf-8"))
    assert record["checkpoint"] == str(checkpoint) and record["model_fingerprint"] == embedder.fingerprint
    assert (record["count"], record["dim"], record["skipped"]) == (8, 32, 1)
    assert record["eval_protocol"]["name"] == "revisitop" and record["scales"] == list(embedder.scales)
    assert not (out / "chunks").exists()

    # A finished output is never replaced without --overwrite.
    one = [str(checkpoint), readable[0], "--out", str(out), "--no-progress"]
    assert embed.main(one) == 1
    assert "holds a finished embedding (8 images" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out / "descriptors.npy"), descriptors)
    assert embed.main(one + ["--overwrite"]) == 0
    assert Embeddings.open(out).files == readable[:1]


def test_an_interrupted_run_continues_where_it_stopped_and_gives_the_same_arrays(embedder, files, reference,
                                                                                 tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        embed_files(embedder, files, out, chunk_size=CHUNK, progress=False, on_chunk_done=interrupt_after(1))
    assert sorted(p.name for p in (out / "chunks").glob("0*")) == [
        "000000.json", "000000.npy", "000001.json", "000001.npy"]
    with pytest.raises(EmbedOutputError, match="no finished embedding.*rerun the same"):
        Embeddings.open(out)

    done: list[int] = []
    result = embed_files(embedder, files, out, chunk_size=CHUNK, progress=False, on_chunk_done=done.append)
    assert done == [2, 3, 4]  # chunks 0 and 1 were not embedded again
    np.testing.assert_array_equal(result.descriptors, reference.descriptors)
    assert result.files == reference.files and result.skipped == reference.skipped


def test_a_run_killed_with_sigkill_is_resumed_by_the_same_command(checkpoint, files, reference, tmp_path):
    out, first = tmp_path / "out", files[:2 * CHUNK]  # two chunks; the child is killed after the first
    probe = textwrap.dedent(f"""
        import os, signal
        from sg_train import embed
        from sg_train.embedder import load_model
        embed.embed_files(load_model({str(checkpoint)!r}), {first!r}, {str(out)!r}, chunk_size={CHUNK}, progress=False,
                          on_chunk_done=lambda c: os.kill(os.getpid(), signal.SIGKILL))
    """)
    env = {**child_env(), "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same float arithmetic as here
    killed = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert sorted(p.name for p in (out / "chunks").glob("*.json")) == ["000000.json", "plan.json"]

    assert embed.main([str(checkpoint), *first, "--out", str(out), "--chunk-size", str(CHUNK), "--no-progress"]) == 0
    np.testing.assert_array_equal(np.load(out / "descriptors.npy"), reference.descriptors[:len(first)])
    assert (out / "files.txt").read_text(encoding="utf-8").split("\n")[:-1] == first == reference.files[:len(first)]


def test_an_unfinished_output_of_another_model_file_list_or_chunk_size_is_refused(embedder, files, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        embed_files(embedder, files, out, chunk_size=CHUNK, progress=False, on_chunk_done=interrupt_after(0))

    with pytest.raises(EmbedOutputError, match=r"another file list \(9 files then, 8 now; first difference at "
                                               r"file 1: .*--overwrite"):
        embed_files(embedder, files[1:], out, chunk_size=CHUNK, progress=False)
    single_scale = Embedder(embedder.model, scales=[1.0])
    with pytest.raises(EmbedOutputError, match=r"another model or protocol .*revisitop with scales .*custom with "
                                               r"scales \[1.0\]"):
        embed_files(single_scale, files, out, chunk_size=CHUNK, progress=False)
    with pytest.raises(EmbedOutputError, match="chunks of 2 files, not 8: pass --chunk-size 2"):
        embed_files(embedder, files, out, chunk_size=8, progress=False)

    # --overwrite starts over with the new settings.
    result = embed_files(single_scale, files[:3], out, chunk_size=8, overwrite=True, progress=False)
    assert result.files == files[:3] and result.record["eval_protocol"]["name"] == "custom"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "files.txt").write_text("mine\n")
    with pytest.raises(EmbedOutputError, match=r"has \['files.txt'\] but no embed.json.*refusing to overwrite"):
        embed_files(embedder, files[:3], foreign, progress=False)
    assert (foreign / "files.txt").read_text() == "mine\n"


def test_search_finds_an_indexed_image_first_and_exact_and_faiss_agree(checkpoint, embedder, reference, tmp_path,
                                                                       capsys):
    index = str(reference.out_dir)
    queries = [reference.files[1], next(f for f in reference.files if "été" in f)]
    assert search.main(["--index", index, *queries, "--top-k", "4", "--json"]) == 0  # the recorded checkpoint
    exact = json.loads(capsys.readouterr().out)
    assert exact["backend"] == "exact" and exact["checkpoint"] == str(checkpoint)
    assert [r["query"] for r in exact["results"]] == queries
    for result in exact["results"]:
        best = result["matches"][0]
        assert best["file"] == result["query"] and best["similarity"] == pytest.approx(1.0, abs=1e-5)
        similarities = [m["similarity"] for m in result["matches"]]
        assert len(similarities) == 4 and similarities == sorted(similarities, reverse=True)

    with_faiss = search.search_gallery(reference, embedder, queries, top_k=4, use_faiss=True)
    for a, b in zip(exact["results"], with_faiss):
        assert [m["file"] for m in a["matches"]] == [m["file"] for m in b["matches"]]
        np.testing.assert_allclose([m["similarity"] for m in a["matches"]], [m["similarity"] for m in b["matches"]],
                                   rtol=0, atol=1e-5)

    everything = search.search_gallery(reference, embedder, queries[:1], top_k=100)  # k beyond the gallery
    text = search.format_results(everything).splitlines()
    assert text[0] == f"query: {queries[0]}" and len(text) == 1 + 8 and text[1].split(None, 2)[2] == queries[0]

    other = tmp_path / "other"  # a gallery embedded by another model, as its record tells
    shutil.copytree(index, other)
    record = json.loads((other / "embed.json").read_text(encoding="utf-8"))
    (other / "embed.json").write_text(json.dumps({**record, "model_fingerprint": "0" * 64}), encoding="utf-8")
    assert search.main(["--index", str(other), queries[0], "--faiss", "--ckpt", str(checkpoint)]) == 1
    assert "is not the model that embedded" in capsys.readouterr().err
    assert search.main(["--index", str(tmp_path), queries[0]]) == 1
    assert "holds no finished embedding: embed.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("under", [False, True], ids=["a-file", "inside-a-file"])
def test_an_out_that_is_a_file_or_inside_one_is_refused_in_one_line(checkpoint, embedder, gallery, files, tmp_path,
                                                                    capsys, under):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    out = existing / "embedding" if under else existing
    argv = [str(checkpoint), str(gallery), "--recursive", "--out", str(out), "--no-progress"]
    assert embed.main(argv) == 1
    err = capsys.readouterr().err
    why = f"is inside {existing}, which is a file, not a folder" if under else "is a file, not a folder"
    assert err.count("\n") == 1 and f"--out {out} {why}; choose another --out" in err
    with pytest.raises(EmbedOutputError, match="is a file, not a folder"):
        embed_files(embedder, files[:1], out, progress=False)
    assert existing.read_text() == "keep me" and sorted(tmp_path.iterdir()) == [existing]


@pytest.mark.parametrize("under", [False, True], ids=["a-file", "inside-a-file"])
def test_search_names_an_index_that_is_a_file(gallery, tmp_path, capsys, under):
    existing = tmp_path / "descriptors.npy"
    existing.write_bytes(b"not a folder")
    index = existing / "sub" if under else existing
    assert search.main(["--index", str(index), str(gallery)]) == 1
    err = capsys.readouterr().err
    why = f"is inside {existing}, which is a file, not a folder" if under else "is a file, not a folder"
    assert err.count("\n") == 1 and f"embedding folder {index} {why}; give the folder" in err
    assert "python -m sg_train.embed" in err


@pytest.mark.parametrize("option, culprit", [
    (["--scales", "nan"], "nan"), (["--scales", "1", "1000"], "not 1000.0"), (["--scales", "1e-9"], "not 1e-09"),
    (["--protocol", "nope"], "unknown evaluation protocol 'nope'"), (["--batch-size", "0"], "--batch-size"),
    (["--chunk-size", "0"], "--chunk-size"),
], ids=["nan", "1000", "1e-9", "protocol", "batch-size", "chunk-size"])
def test_bad_options_are_named_before_the_output_folder_and_the_model(checkpoint, gallery, reference, tmp_path,
                                                                        capsys, monkeypatch, option, culprit):
    """--scales 1000 died in the allocator and 1e-9 embedded 1-px images; on a finished --out, --scales nan
    was reported as "holds a finished embedding"; --batch-size 0 failed after the model was loaded,
    leaving chunks/ behind."""
    import sg_train.embedder

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(sg_train.embedder, "load_model", no_model)
    for out in (reference.out_dir, tmp_path / "new"):  # a finished output, and one not made yet
        argv = [str(checkpoint), str(gallery), "--out", str(out), "--no-progress", *option]
        assert embed.main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and culprit in err and "finished embedding" not in err, err
    assert not (tmp_path / "new").exists()


def test_a_folder_of_unreadable_images_is_an_error_naming_it_and_its_reasons(checkpoint, embedder, gallery, tmp_path,
                                                                               capsys):
    """It exited 0 with a "finished" 0 x D output."""
    broken = tmp_path / "broken photos"
    broken.mkdir()
    shutil.copy(gallery / "broken.jpg", broken / "a.jpg")
    (broken / "b.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = [str(checkpoint), str(broken), "--out", str(out), "--no-progress"]
    assert embed.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"none of the 2 images under {broken} could be read" in err, err
    assert str(broken / "a.jpg") in err and str(out / "skipped.tsv") in err
    assert not (out / "embed.json").exists() and not (out / "descriptors.npy").exists()
    assert (out / "notes.txt").read_text() == "keep me"
    skipped = (out / "skipped.tsv").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in skipped] == ["path", str(broken / "a.jpg"), str(broken / "b.png")]
    with pytest.raises(EmbedOutputError, match="holds no finished embedding"):
        Embeddings.open(out)
    assert embed.main(argv) == 1  # the same command: the same error, nothing embedded again
    assert "none of the 2 images" in capsys.readouterr().err
    with pytest.raises(UserInputError, match="none of the 2 images"):
        embed_files(embedder, [str(broken / "a.jpg"), str(broken / "b.png")], tmp_path / "api", progress=False)


def test_search_takes_a_query_whose_name_holds_a_line_break_in_json_and_names_it_in_text(reference, tmp_path,
                                                                                          capsys):
    """search writes neither files.txt nor skipped.tsv: embed's listing rule refused such a query with
    a message about them."""
    query = tmp_path / "two\nlines.jpg"
    shutil.copy(reference.files[0], query)
    assert search.main(["--index", str(reference.out_dir), str(query), "--top-k", "1", "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert found["results"][0]["query"] == str(query)
    assert found["results"][0]["matches"][0]["file"] == reference.files[0]
    assert search.main(["--index", str(reference.out_dir), str(query)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "files.txt" not in err and "skipped.tsv" not in err
    assert "holds a line break" in err and "--json" in err
