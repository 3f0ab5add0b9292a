"""Damaged checkpoints: verified against the manifest written with them, skipped on resume with a
warning naming what is wrong, one clear error when none is intact."""

import hashlib
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import nn

from sslkit.config import Config, load_config
from sslkit.engine import checkpoint, read_metrics, train
from sslkit.engine.checkpoint import (
    MANIFEST, CheckpointWarning, DamagedCheckpointError, find_resumable, list_checkpoints, load_feature_model,
    save_checkpoint, verify_checkpoint,
)
from sslkit.errors import UserError
from tests.conftest import TINY_RECIPE, run_sslkit

# 16 steps per epoch, a checkpoint every 6 steps, 3 kept: epoch_0001_step_00000024,
# epoch_0001_step_00000030 and epoch_0002 (step 32, 'last').
RESUMABLE = ["data.train_limit=1024", "train.epochs=2", "train.checkpoint_every_steps=6", "eval.knn=false",
             "train.keep_checkpoints=3"]
LAST, PREVIOUS = "epoch_0002", "epoch_0001_step_00000030"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(recipe, run directory, final weights) of one uninterrupted run of the tiny recipe."""
    root = tmp_path_factory.mktemp("trained")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    train(load_config(recipe, [f"train.output_dir={root}", "train.name=run", *RESUMABLE]))
    run = root / "run"
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == [LAST, PREVIOUS, "epoch_0001_step_00000024"]
    return recipe, run, load_file(run / "checkpoints" / "last" / "model.safetensors")


@pytest.fixture
def run(trained, tmp_path: Path) -> Path:
    """A copy of the trained run for a test to damage (``last`` stays a relative symlink)."""
    copy = tmp_path / "run"
    shutil.copytree(trained[1], copy, symlinks=True)
    return copy


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _flip_last_byte(path: Path) -> None:
    """Same size, one bit different: only a checksum tells."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _flip_a_bit_of_a_member(archive: Path) -> None:
    """One bit in the middle of a zip member's data, leaving the archive's structure intact."""
    with zipfile.ZipFile(archive) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    data = bytearray(archive.read_bytes())
    # the local header: 30 bytes, then the name and extra field of the lengths at offsets 26 and 28
    name_len, extra_len = struct.unpack_from("<HH", data, member.header_offset + 26)
    data[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x01
    archive.write_bytes(bytes(data))


def test_the_manifest_lists_every_file_with_its_size_and_sha256(run):
    for ckpt in list_checkpoints(run / "checkpoints"):
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = {p.name for p in ckpt.iterdir()} - {MANIFEST}
        # every file the save wrote is listed: nothing was written after the manifest
        assert set(manifest["files"]) == files >= {"model.safetensors", "optimizer.bin", "config.yaml"}
        for name, entry in manifest["files"].items():
            data = (ckpt / name).read_bytes()
            assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_checkpoints_are_ordered_by_step_not_by_name(tmp_path):
    # epoch_E is the end of epoch E; epoch_E_step_S lies inside the next one (S > E x steps per epoch)
    for name in ("epoch_0001", "epoch_0001_step_00000024", "epoch_0002", "epoch_9999", "epoch_10000",
                 "epoch_0003_step_100000000", "epoch_0003_step_99999999", ".tmp_epoch_20000", "plots"):
        (tmp_path / name).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch_10000", "epoch_9999", "epoch_0003_step_100000000", "epoch_0003_step_99999999", "epoch_0002",
        "epoch_0001_step_00000024", "epoch_0001"]


def test_a_truncated_last_resumes_from_the_previous_checkpoint_and_ends_with_the_same_weights(trained, run):
    recipe, _, final = trained
    _truncate(run / "checkpoints" / LAST / "model.safetensors")
    cfg = load_config(recipe, [f"train.output_dir={run.parent}", "train.name=run", *RESUMABLE, "resume=true"])
    with pytest.warns(CheckpointWarning, match=rf"{LAST}: model.safetensors is \d+ bytes, but \d+ were saved"):
        train(cfg)
    resume = [m for m in read_metrics(run) if m.get("event") == "resume"]
    assert [m["step"] for m in resume] == [30]  # from epoch_0001_step_00000030
    resumed = load_file(run / "checkpoints" / "last" / "model.safetensors")
    assert resumed.keys() == final.keys()
    assert all(torch.equal(resumed[k], final[k]) for k in final)
    verify_checkpoint(run / "checkpoints" / LAST)  # saved again, intact


@pytest.mark.parametrize("damage, problem", [
    (lambda d: _flip_last_byte(d / "model.safetensors"), "model.safetensors is not the file that was saved"),
    (lambda d: _flip_last_byte(d / "optimizer.bin"), "optimizer.bin is not the file that was saved"),
    (lambda d: _flip_last_byte(d / "config.yaml"), "config.yaml is not the file that was saved"),
    (lambda d: (d / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    (lambda d: (d / MANIFEST).write_text('{"files": '), f"{MANIFEST} is unreadable"),
    (lambda d: shutil.rmtree(d), "points to epoch_0002, which does not exist"),
], ids=["flipped-weights", "flipped-optimizer", "flipped-config", "missing-file", "bad-manifest", "no-directory"])
def test_a_damaged_last_is_named_and_the_previous_checkpoint_is_used(run, damage, problem):
    damage(run / "checkpoints" / LAST)
    with pytest.warns(CheckpointWarning, match=problem):
        assert find_resumable(run / "checkpoints").name == PREVIOUS


def test_every_checkpoint_damaged_is_one_error(run):
    for ckpt in list_checkpoints(run / "checkpoints"):
        _truncate(ckpt / "optimizer.bin")
    with pytest.warns(CheckpointWarning) as warned, pytest.raises(UserError, match="overwrite=true") as error:
        find_resumable(run / "checkpoints")
    assert len(warned) == 3 and all("optimizer.bin is" in str(w.message) for w in warned)
    assert "\n" not in str(error.value) and LAST in str(error.value)


def test_resume_without_any_checkpoint_keeps_its_message(tmp_path, tiny_recipe):
    cfg = load_config(tiny_recipe, [f"train.output_dir={tmp_path}", "train.name=run", "resume=true"])
    with pytest.raises(UserError, match="nothing to resume"):
        train(cfg)


def test_a_save_interrupted_before_its_manifest_is_not_taken(tmp_path, monkeypatch):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(nn.Linear(2, 2))
    save_checkpoint(accelerator, Config(), tmp_path, "epoch_0001", keep=2)

    def killed(ckpt_dir: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, Config(), tmp_path, "epoch_0002", keep=2)
    assert (tmp_path / ".tmp_epoch_0002" / "model.safetensors").is_file()  # all but the manifest
    assert find_resumable(tmp_path) == tmp_path / "epoch_0001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_0001"]


def test_a_checkpoint_from_before_manifests_is_accepted_with_a_warning_once_its_files_open(run):
    ckpts = list_checkpoints(run / "checkpoints")
    for ckpt in ckpts:
        (ckpt / MANIFEST).unlink()
    with pytest.warns(CheckpointWarning, match="cannot be verified byte for byte"):
        assert find_resumable(run / "checkpoints").name == LAST
    # what such a checkpoint is checked for: a safetensors file cut short, a torch.save archive's CRC
    _truncate(ckpts[0] / "model.safetensors")
    _flip_a_bit_of_a_member(ckpts[1] / "optimizer.bin")
    with pytest.warns(CheckpointWarning) as warned:
        assert find_resumable(run / "checkpoints") == ckpts[2]
    problems = [str(w.message) for w in warned if "damaged" in str(w.message)]
    assert len(problems) == 2
    assert "model.safetensors is unreadable" in problems[0] and "incomplete metadata" in problems[0]
    assert "optimizer.bin is corrupt" in problems[1]




def test_loading_a_damaged_checkpoint_for_evaluation_names_the_file(run):
    good = run / "checkpoints" / PREVIOUS
    load_feature_model(good)
    _truncate(run / "checkpoints" / LAST / "model.safetensors")
    with pytest.raises(DamagedCheckpointError, match=rf"{LAST}: model.safetensors is \d+ bytes") as error:
        load_feature_model(run / "checkpoints" / "last")
    assert "\n" not in str(error.value)
    _truncate(run / "backbone.safetensors")
    with pytest.raises(UserError, match="backbone.safetensors is damaged"):
        load_feature_model(run / "backbone.safetensors")


@pytest.mark.slow
def test_every_checkpoint_damaged_through_the_cli_is_one_error_line(trained, run):
    recipe = trained[0]
    for ckpt in list_checkpoints(run / "checkpoints"):
        _truncate(ckpt / "model.safetensors")
    done = run_sslkit("train", str(recipe), f"train.output_dir={run.parent}", "train.name=run", *RESUMABLE,
                      "resume=true")
    errors = [line for line in done.stderr.splitlines() if line.startswith("sslkit: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and "is intact" in errors[0] and "overwrite=true" in errors[0]
    assert done.stderr.count("damaged checkpoint") == 3  # each named in its warning
    assert len(list_checkpoints(run / "checkpoints")) == 3  # nothing removed

    done = run_sslkit("eval", "knn", "--checkpoint", str(run / "checkpoints" / "last"), "--data", "synthetic")
    errors = [line for line in done.stderr.splitlines() if line.startswith("sslkit: error:")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert len(errors) == 1 and "model.safetensors is" in errors[0]
