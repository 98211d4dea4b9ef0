"""Odd but plausible GLDv2 CSVs (header only, blank lines, BOM, another encoding, landmarks
without images) get a message that names the file and what is wrong with it."""
from __future__ import annotations

import codecs

import pytest

from datamodules.gldv2_index import GLDv2CSVError, build_gldv2_split, read_gldv2_csv


def _read_error(path) -> str:
    with pytest.raises(GLDv2CSVError) as err:
        read_gldv2_csv(path)
    message = str(err.value)
    assert str(path) in message
    return message


@pytest.mark.parametrize(
    "name, content, row",
    [
        ("train.csv", b"id,url,landmark_id\n", "one line per image: id,url,landmark_id"),
        ("train_clean.csv", b"landmark_id,images\n", "one line per landmark: landmark_id,images"),
        ("train.csv", codecs.BOM_UTF8 + b"id,url,landmark_id\r\n", "one line per image"),
        ("train.csv", b"id,url,landmark_id\n\n\n", "one line per image"),
    ],
)
def test_header_only_csv_says_it_has_no_rows(tmp_path, name, content, row):
    path = tmp_path / name
    path.write_bytes(content)
    message = _read_error(path)
    assert "has a header line but no rows" in message and row in message
    assert "64-bit" not in message
    with pytest.raises(GLDv2CSVError, match="no rows"):  # the datamodule's entry point says the same
        build_gldv2_split(path)


@pytest.mark.parametrize("content", [b"\n\n\n", b"  \n", codecs.BOM_UTF8])
def test_blank_or_bom_only_file_asks_for_the_header(tmp_path, content):
    path = tmp_path / "train.csv"
    path.write_bytes(content)
    message = _read_error(path)
    assert "empty file or only blank lines" in message
    assert "'id,url,landmark_id' (train.csv) or 'landmark_id,images' (train_clean.csv)" in message


def test_clean_csv_whose_landmarks_list_no_images(tmp_path):
    path = tmp_path / "train_clean.csv"
    path.write_text("landmark_id,images\n5,\n6,\n")
    assert "its 2 landmark row(s) list no image ids (column 'images' is empty)" in _read_error(path)


@pytest.mark.parametrize(
    "content, byte",
    [
        ("id,url,landmark_id\nabcd,u,3\n".encode("utf-16"), r"b'\xff'"),
        ("id,url,landmark_id\nab\xe9cd,u,3\n".encode("latin-1"), r"b'\xe9'"),
    ],
)
def test_csv_in_another_encoding_is_named(tmp_path, content, byte):
    path = tmp_path / "train.csv"
    path.write_bytes(content)
    message = _read_error(path)
    assert f"not UTF-8 text (it holds the byte {byte}); save the file as UTF-8" in message


def test_bom_and_crlf_files_with_rows_are_read(tmp_path):
    train = tmp_path / "train.csv"
    train.write_bytes(codecs.BOM_UTF8 + b"id,url,landmark_id\r\nabcd,u,3\r\nabce,u,4\r\n")
    clean = tmp_path / "train_clean.csv"
    clean.write_bytes(codecs.BOM_UTF8 + b"landmark_id,images\r\n3,abcd\r\n4,abce\r\n")
    a, b = read_gldv2_csv(train), read_gldv2_csv(clean)
    assert a.ids.tolist() == b.ids.tolist() == [b"abcd", b"abce"]
    assert a.landmark_ids.tolist() == b.landmark_ids.tolist() == [3, 4]
