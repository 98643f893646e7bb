"""Test-only readers of W&B's offline run files (`run-<id>.wandb`), so tests check what W&B
would receive without a server or mocks."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

_BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc, length, type) chunks
_HEADER = 7  # ":W&B" + magic + version


def _records(path: Path) -> list[bytes]:
    data = path.read_bytes()
    records, partial, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # a block tail too short for a chunk header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            records.append(chunk)
        elif kind == 2:  # FIRST
            partial = chunk
        elif kind == 3:  # MIDDLE
            partial += chunk
        elif kind == 4:  # LAST
            records.append(partial + chunk)
            partial = b""
    return records


def read_wandb_run(path: Path) -> dict[str, Any]:
    """Read a local `run-<id>.wandb` file (offline or not yet synced) into plain Python:
    {"run_id", "group", "config", "history": [{"_step": n, key: value, ...}], "summary"}.

    Values are JSON-decoded; tables and plots appear as their W&B reference dicts.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    def key(item: Any) -> str:
        return item.key or "/".join(item.nested_key)

    out: dict[str, Any] = {"run_id": None, "group": None, "config": {}, "history": [], "summary": {}}
    for raw in _records(path):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            out["group"] = record.run.run_group
            out["config"].update({key(i): json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "config":
            out["config"].update({key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            out["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in record.summary.update})
    out["config"].pop("_wandb", None)
    return out


def offline_runs(run_dir: Path) -> list[Path]:
    """The `.wandb` files under `run_dir/wandb/`, oldest first (one per process that tracked the run)."""
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
