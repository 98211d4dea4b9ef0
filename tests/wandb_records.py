"""Read what an offline W&B run wrote (``offline-run-*/run-<id>.wandb``), for tests.

wandb 0.31 no longer ships a reader for its run files. The format is a LevelDB-style log: a
7-byte file header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a
7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) around a chunk of a
serialised ``wandb.proto.wandb_internal_pb2.Record``; block tails shorter than a header are zero
padding.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path):
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError(f"{path} is not a W&B run file (header {ident!r} {magic:#x})")
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        space = BLOCK - offset % BLOCK
        if space < HEADER:
            offset += space
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind == 0:  # zero padding: the writer moved on to the next block
            offset += space
            continue
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def run_file(wandb_dir: str | Path) -> Path:
    """The one offline run file under ``wandb_dir``, after finishing the live run (which flushes it)."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    files = sorted(Path(wandb_dir).glob("**/offline-run-*/run-*.wandb"))
    if len(files) != 1:
        raise AssertionError(f"expected one offline run under {wandb_dir}, found {files}")
    return files[0]


def history(path: str | Path) -> list[dict]:
    """Every ``wandb.log`` call of the run, as dicts of decoded values."""
    rows = []
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
    return rows


def config(path: str | Path) -> dict:
    """The run's config (from its run record, merged with later config records)."""
    merged: dict = {}
    for record in iter_records(path):
        kind = record.WhichOneof("record_type")
        updates = record.config.update if kind == "config" else record.run.config.update if kind == "run" else ()
        for item in updates:
                merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return merged
