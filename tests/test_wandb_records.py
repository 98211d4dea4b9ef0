"""tests/wandb_records.py: the reader of offline W&B run files, and reading a run only once wandb-core wrote it."""
from __future__ import annotations

import os
import signal
import struct
import threading
import zlib

import pytest
from wandb.proto import wandb_internal_pb2

import wandb_records
from wandb_records import BLOCK, FIRST, FULL, HEADER, LAST, MIDDLE


def write_run_file(path, payloads: list[bytes]) -> bytes:
    """A run file the way wandb-core's leveldb writer lays it out (core/pkg/leveldb/record.go)."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for payload in payloads:
        if BLOCK - len(out) % BLOCK < HEADER:
            out += bytes(BLOCK - len(out) % BLOCK)  # a tail too short for a header: zeros
        first = True
        while True:
            room = BLOCK - len(out) % BLOCK - HEADER
            chunk, payload = payload[:room], payload[room:]
            kind = (FULL if first else LAST) if not payload else (FIRST if first else MIDDLE)
            out += struct.pack("<IHB", zlib.crc32(bytes([kind]) + chunk), len(chunk), kind) + chunk
            first = False
            if not payload:
                break
    path.write_bytes(bytes(out))
    return bytes(out)


def history_record(step: int, filler: str = "") -> bytes:
    record = wandb_internal_pb2.Record()
    item = record.history.item.add()
    item.key, item.value_json = "step", str(step)
    if filler:
        item = record.history.item.add()
        item.key, item.value_json = "filler", f'"{filler}"'
    return record.SerializeToString()


def payload_of_size(step: int, size: int) -> bytes:
    """A history record serialised to exactly ``size`` bytes."""
    for n in range(size):
        payload = history_record(step, "x" * n)
        if len(payload) == size:
            return payload
    raise AssertionError(size)


def steps(path) -> list[int]:
    return [row["step"] for row in wandb_records.history(path)]


def test_records_across_block_boundaries_padding_and_an_empty_first_chunk(tmp_path):
    cases = {
        "exact_fit": BLOCK - HEADER - HEADER,  # fills block 0 to its last byte
        "tail_of_7": BLOCK - HEADER - HEADER - HEADER,  # leaves exactly a header: an empty first chunk
        "tail_of_3": BLOCK - HEADER - HEADER - 3,  # leaves 3 bytes of zero padding
        "spans_3_blocks": 2 * BLOCK + 100,  # first, middle, last
    }
    for name, size in cases.items():
        path = tmp_path / f"{name}.wandb"
        write_run_file(path, [payload_of_size(0, size), history_record(1), payload_of_size(2, BLOCK // 2), history_record(3)])
        assert steps(path) == [0, 1, 2, 3], name
    tail_of_7 = (tmp_path / "tail_of_7.wandb").read_bytes()
    assert struct.unpack("<IHB", tail_of_7[BLOCK - HEADER : BLOCK])[1:] == (0, FIRST)  # the empty first chunk
    tail_of_3 = (tmp_path / "tail_of_3.wandb").read_bytes()
    assert tail_of_3[BLOCK - 3 : BLOCK] == bytes(3)


def test_damaged_or_half_written_files_are_errors_not_empty_runs(tmp_path):
    path = tmp_path / "run.wandb"
    data = write_run_file(path, [history_record(0), payload_of_size(1, BLOCK)])
    assert steps(path) == [0, 1]
    for name, damaged in {
        "cut inside a chunk": data[:1000],
        "cut between the chunks of a record": data[:BLOCK],
        "cut inside a chunk header": data[: BLOCK + 3],
        "bad checksum": data[:20] + bytes([data[20] ^ 1]) + data[21:],
        "zeroed chunk header": data[: HEADER] + bytes(HEADER) + data[2 * HEADER :],
    }.items():
        path.write_bytes(damaged)
        with pytest.raises(ValueError):
            steps(path)
            pytest.fail(name)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP/SIGCONT")
def test_run_file_waits_for_wandb_core_to_write_the_run(tmp_path, monkeypatch):
    """wandb.finish() returns before wandb-core has closed the run's stream, which writes the last
    block of the run file. Stop wandb-core when the finish is sent (what CPU load does to it, as
    after `make demo`): run_file must still return the whole run, not a 7-byte header."""
    import wandb
    from wandb.sdk.lib.service import service_connection

    inform_finish = service_connection.ServiceConnection.inform_finish

    def descheduled_core(self, run_id):
        pid = self._proc._process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            inform_finish(self, run_id)
        finally:
            threading.Timer(0.5, os.kill, (pid, signal.SIGCONT)).start()

    monkeypatch.setattr(service_connection.ServiceConnection, "inform_finish", descheduled_core)
    run = wandb.init(project="sg-train-tests", dir=tmp_path, config={"backbone": "resnet18"})
    for step in range(3):
        run.log({"train/loss": 1.0 / (step + 1)}, step=step)
    path = wandb_records.run_file(tmp_path)
    assert [row["train/loss"] for row in wandb_records.history(path)] == [1.0, 0.5, 1.0 / 3]
    assert wandb_records.config(path)["backbone"] == "resnet18"
