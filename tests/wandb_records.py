"""Read a W&B run file (`run-*.wandb`) back, for tests: the file is W&B's 7-byte header followed by
LevelDB-log records (32 KiB blocks, each record: crc32, length, type), each a protobuf `Record`."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7  # ":W&B" + magic (2 bytes) + version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, chunks = [], HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # block trailer padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == FULL:
            chunks = payload
        elif kind == FIRST:
            chunks = payload
            continue
        elif kind == MIDDLE:
            chunks += payload
            continue
        elif kind == LAST:
            chunks += payload
        rec = pb.Record()
        rec.ParseFromString(chunks)
        out.append(rec)
    return out


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> dict[str, Any]:
    """config, history rows, summary and run name of one offline run."""
    run: dict[str, Any] = {"config": {}, "history": [], "summary": {}, "name": None, "group": None}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run["name"], run["group"] = r.run.display_name, r.run.run_group
            run["config"].update({_key(i): json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            run["config"].update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            run["history"].append({_key(i): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            run["summary"].update({_key(i): json.loads(i.value_json) for i in r.summary.update})
    return run
