"""``train.trackers`` log the same numbers as metrics.jsonl: TensorBoard, and W&B offline."""

import json
import struct

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto import wandb_internal_pb2

from sslkit.engine import read_metrics
from tests.conftest import run_sslkit


def _run(tiny_recipe, tmp_path, tracker, env=None):
    """Through the CLI: W&B's service writes its offline file out when the process ends."""
    done = run_sslkit("train", str(tiny_recipe), f"train.output_dir={tmp_path}", "train.name=run",
                      f"train.trackers=[{tracker}]", "train.max_steps=4", "train.epochs=1", "eval.knn_k=5", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return [m for m in read_metrics(tmp_path / "run") if "loss" in m]


def test_tensorboard_has_the_metrics(tiny_recipe, tmp_path):
    logged = _run(tiny_recipe, tmp_path, "tensorboard")
    events = EventAccumulator(str(next((tmp_path / "run" / "trackers").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    for key in ("loss", "lr", "online_top1"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [m["step"] for m in logged]
        assert [s.value for s in scalars] == pytest.approx([m[key] for m in logged], rel=1e-6)
    assert events.Scalars("knn_top1")  # evaluation events too


def _wandb_history(path):
    """The history rows of an offline W&B run file (a LevelDB-style log of protobuf records;
    wandb no longer ships a Python reader)."""
    data, pos, block, records, pending = path.read_bytes(), 7, 32768, [], b""  # 7: W&B's file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last fragment of one
            records.append(pending)
            pending = b""
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def test_wandb_offline_has_the_metrics(tiny_recipe, tmp_path):
    logged = _run(tiny_recipe, tmp_path, "wandb", env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    rows = [r for r in _wandb_history(next((tmp_path / "run" / "trackers").rglob("run-*.wandb"))) if "loss" in r]
    assert [r["_step"] for r in rows] == [m["step"] for m in logged]
    assert [r["loss"] for r in rows] == pytest.approx([m["loss"] for m in logged], rel=1e-6)
