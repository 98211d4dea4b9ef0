"""Read what an offline W&B run wrote (``offline-run-*/run-<id>.wandb``), for tests.

wandb 0.31 no longer ships a reader for its run files. The format is a LevelDB-style log: a
7-byte file header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of records, each with a
7-byte header (crc32 of the type byte and the data, length, type: 1 full, 2 first, 3 middle,
4 last) around a chunk of a serialised ``wandb.proto.wandb_internal_pb2.Record``. The file header
counts as part of block 0. A block tail shorter than a chunk header is zero padding; a tail of
exactly 7 bytes holds an empty ``first`` chunk. Anything else (a zero or unknown chunk header, a bad
checksum, a chunk cut off by the end of the file, a record left unfinished) is an error here, not
something to skip: a reader that skips quietly turns a damaged or half-written file into "nothing
was logged".

wandb-core buffers the current block in memory and writes it out when the block is full, every
``x_transaction_log_flush_interval`` seconds (15 s by default, 1 s under train.py: see
``sg_train.wandb_mode.FLUSH_INTERVAL_ENV``) and when the run's stream closes. That close happens
when wandb-core handles the ``inform_finish`` message that ``wandb.finish()`` sends *without
waiting for an answer*, so when ``finish()`` returns the file can still lack the run's last
records. ``run_file`` therefore also calls ``wandb.teardown()``, which waits for the wandb-core
process to exit (it handles a connection's messages in order, so the finish, and with it the
write, comes first), and then checks that the file ends the run (has its ``exit`` record).

When the training process is killed, wandb-core exits within 0.1 s (it watches its parent) without
writing what it holds, so the file is a prefix of the log: it ends where wandb-core's last write
ended, at a flush (a record boundary) or at the end of a block that filled, often inside a record
that spans into the block never written; a write cut by the exit would end it inside a chunk.
Readers given ``killed=True`` read up to that end and leave the unfinished record out; everything
before it must still be whole.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4
IDENT, MAGIC, VERSION = b":W&B", 0xBEE1, 0


def iter_records(path: str | Path, *, killed: bool = False):
    """Every record of the run file, in order; ``ValueError`` where the file is not a whole log.

    ``killed``: the run's process was killed, so the file may end anywhere (see the module
    docstring): the records before that end are read, an unfinished one is left out.
    """
    data = Path(path).read_bytes()
    if len(data) < HEADER:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than the W&B file header")
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    if ident != IDENT or magic != MAGIC:
        raise ValueError(f"{path} is not a W&B run file (header {ident!r} {magic:#x})")
    if version != VERSION:
        raise ValueError(f"{path}: W&B run file version {version}, this reader knows {VERSION}")
    offset, pending, in_record = HEADER, b"", False
    while offset < len(data):
        space = BLOCK - offset % BLOCK
        if space < HEADER:  # too short for a chunk header: the writer zero-filled it
            if data[offset : offset + space].strip(b"\0"):
                raise ValueError(f"{path}: non-zero bytes in the block padding at offset {offset}")
            offset += space
            continue
        if offset + HEADER > len(data):
            if killed:
                return
            raise ValueError(f"{path}: ends inside a chunk header at offset {offset}")
        checksum, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if kind not in (FULL, FIRST, MIDDLE, LAST):
            raise ValueError(f"{path}: chunk type {kind} at offset {offset} (zeroed or damaged)")
        end = offset + HEADER + length
        if length > space - HEADER:
            raise ValueError(f"{path}: chunk at offset {offset} ({length} bytes) runs past its block")
        if end > len(data):
            if killed:
                return
            raise ValueError(f"{path}: chunk at offset {offset} cut off by the end of the file")
        if zlib.crc32(data[offset + HEADER - 1 : end]) != checksum:
            raise ValueError(f"{path}: bad checksum of the chunk at offset {offset}")
        if (kind in (FULL, FIRST)) == in_record:
            raise ValueError(f"{path}: chunk type {kind} at offset {offset} out of order")
        pending = data[offset + HEADER : end] if kind in (FULL, FIRST) else pending + data[offset + HEADER : end]
        in_record = kind in (FIRST, MIDDLE)
        offset = end
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""
    if in_record and not killed:
        raise ValueError(f"{path}: ends inside a record")


def run_files(wandb_dir: str | Path) -> list[Path]:
    """Every offline run file under ``wandb_dir`` (a resumed run adds one), oldest first, each
    complete: finishes the live run, waits for wandb-core to write and close the file
    (``wandb.teardown``), checks each has the ``exit`` record."""
    import wandb

    if wandb.run is not None:
        wandb.finish()
    # finish() does not wait for wandb-core to close the run's stream (which writes the last,
    # partly filled block); teardown() waits for the wandb-core process to exit. A later
    # wandb.init starts a new one.
    wandb.teardown()
    # offline-run-<YYYYmmdd_HHMMSS>-<id>: the folder names sort by start time
    files = sorted(Path(wandb_dir).glob("**/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    for path in files:
        kinds = [record.WhichOneof("record_type") for record in iter_records(path)]
        if "exit" not in kinds:
            raise AssertionError(
                f"{path} ({path.stat().st_size} bytes, records {kinds}) has no exit record: "
                "wandb-core has not finished writing it"
            )
    return files


def run_file(wandb_dir: str | Path) -> Path:
    """The one offline run file under ``wandb_dir``, complete (see :func:`run_files`)."""
    files = run_files(wandb_dir)
    if len(files) != 1:
        raise AssertionError(f"expected one offline run under {wandb_dir}, found {files}")
    return files[0]


def run_record(path: str | Path) -> dict:
    """The run's identity as its ``run`` record gives it: ``{"run_id", "sweep_id"}`` (sweep_id: "" outside a sweep)."""
    run = next(r.run for r in iter_records(path) if r.WhichOneof("record_type") == "run")
    return {"run_id": run.run_id, "sweep_id": run.sweep_id}


def history(path: str | Path, *, killed: bool = False) -> list[dict]:
    """Every ``wandb.log`` call of the run, as dicts of decoded values (``killed``: see :func:`iter_records`)."""
    rows = []
    for record in iter_records(path, killed=killed):
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


def summary(path: str | Path) -> dict:
    """The run's summary as its records leave it: every ``summary`` record's updates in order (what
    ``run.summary[...] = ...`` sets, and what wandb-core copies from each history row), removals
    applied; nested keys joined with "/". A ``wandb.Table`` reads as its file reference."""
    merged: dict = {}
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                merged[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.summary.remove:
                merged.pop(item.key or "/".join(item.nested_key), None)
    return merged


def metric_definitions(path: str | Path) -> dict[str, dict]:
    """``define_metric`` calls of the run: ``{name or glob: {"summary": [...], "goal": ...}}``."""
    out = {}
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "metric":
            m = record.metric
            summary = [f.name for f, on in m.summary.ListFields() if on]
            out[m.name or m.glob_name] = {"summary": summary, "goal": m.goal}
    return out


def artifacts(path: str | Path) -> list[dict]:
    """The artifacts the run logged: ``{"name", "type", "aliases", "metadata", "files", "local"}`` each
    (``local``: file name -> the staged copy W&B uploads at ``wandb sync``)."""
    out = []
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "artifact":
            a = record.artifact
            out.append({"name": a.name, "type": a.type, "aliases": list(a.aliases),
                        "metadata": json.loads(a.metadata) if a.metadata else {},
                        "files": [entry.path for entry in a.manifest.contents],
                        "local": {entry.path: Path(entry.local_path) for entry in a.manifest.contents}})
    return out
