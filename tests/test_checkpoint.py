"""The Checkpointer and the run folder: claiming output_dir, when checkpoints are written and which are kept,
resume identity, metrics trimming, atomic files and manifests."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from scalelora import checkpoint as ckpt
from scalelora import config as config_lib
from scalelora import files, signing
from scalelora.errors import CheckpointError, UntrustedCheckpointError, UserError
from scalelora.train import main


class OneProcess:
    """The part of an Accelerator the run-folder policy talks to, for one process."""

    is_main_process = True
    is_local_main_process = True
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass


def checkpointer(run_dir: Path, resume: str | None = None, overwrite: bool = False, every: int | None = None):
    lines: list[str] = []
    keeper = ckpt.Checkpointer(
        OneProcess(), run_dir, resume, overwrite, every, keep_last=2, echo=lines.append
    )
    return keeper, lines


def test_checkpoints_are_due_every_n_steps_and_once_at_the_last_step(tmp_path):
    keeper, _ = checkpointer(tmp_path, every=3)
    due = [step for step in range(1, 8) if keeper.due(step, last=step == 7)]
    assert due == [3, 6, 7]
    keeper.last_saved_step = 6
    assert not keeper.due(6, last=True)  # the last step was just saved: not twice
    never, _ = checkpointer(tmp_path, every=None)
    assert [s for s in range(1, 5) if never.due(s, last=s == 4)] == [4]


def test_maybe_save_asks_for_the_state_only_when_it_saves(tmp_path, monkeypatch):
    keeper, _ = checkpointer(tmp_path, every=2)
    saved = []
    monkeypatch.setattr(
        ckpt, "save_checkpoint", lambda acc, root, step, state, keep: saved.append(step) or root
    )

    def state() -> dict:
        asked.append(True)
        return {}

    asked: list[bool] = []
    for step in range(1, 5):
        keeper.maybe_save(step, step == 4, state)
    assert saved == [2, 4] and len(asked) == 2 and keeper.last_saved_step == 4


def test_maybe_save_enters_around_only_when_it_saves_and_takes_the_state_inside(tmp_path, monkeypatch):
    """The loop times a save (and pauses its throughput clock, a device sync on CUDA) in `around`: never
    on a step that saves nothing."""
    keeper, _ = checkpointer(tmp_path, every=2)
    events: list[str] = []
    monkeypatch.setattr(
        ckpt, "save_checkpoint", lambda acc, root, step, state, keep: events.append(f"save {step}") or root
    )

    @contextlib.contextmanager
    def around():
        events.append("enter")
        yield
        events.append("exit")

    for step in range(1, 6):
        keeper.maybe_save(step, step == 5, lambda: events.append("state") or {}, around)
    saves = [["enter", "state", f"save {step}", "exit"] for step in (2, 4, 5)]
    assert events == [event for save in saves for event in save]


def test_a_used_output_dir_is_refused_and_overwrite_clears_only_run_outputs(tmp_path):
    (tmp_path / "summary.json").write_text("{}")
    (tmp_path / "checkpoints" / "step-2").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("mine")
    keeper, _ = checkpointer(tmp_path)
    with pytest.raises(UserError, match="already holds a run .*summary.json.*resume=auto"):
        keeper.claim()
    assert not (tmp_path / ".lock").exists(), "a refused claim must release the lock"
    keeper, _ = checkpointer(tmp_path, overwrite=True)
    assert keeper.claim() is None
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "checkpoints").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"
    keeper.release()


def test_resume_auto_takes_the_newest_valid_checkpoint_and_says_so(tmp_path):
    for step in (2, 4):
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        files.atomic_write_json(folder / ckpt.TRAINER_STATE, {"global_step": step})
        ckpt.write_manifest(folder)
    (tmp_path / "checkpoints" / "step-4" / ckpt.TRAINER_STATE).write_text("{}")  # damaged after its manifest
    keeper, lines = checkpointer(tmp_path, resume="auto")
    assert keeper.claim() == tmp_path / "checkpoints" / "step-2"
    assert any("skipping checkpoint step-4" in line for line in lines)
    keeper.release()


def test_a_checkpoint_of_another_config_is_refused_naming_the_key(tmp_path):
    folder = tmp_path / "checkpoints" / "step-2"
    folder.mkdir(parents=True)
    config = {
        "model": {"name": "m", "mode": "lora"},
        "lora": {"r": 8, "target_modules": None},
        "data": {"path": "d", "keep_labels": None},
    }
    files.atomic_write_json(
        folder / ckpt.TRAINER_STATE, {"identity": ckpt.resume_identity(config, ["a", "b"])}
    )
    config["lora"]["r"] = 16
    keeper, _ = checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match="lora.r: checkpoint 8, now 16"):
        keeper.resume(folder, ckpt.resume_identity(config, ["a", "b"]))


def test_every_config_key_is_either_part_of_the_resume_identity_or_free_to_change():
    """Derived from config.py: every key is in exactly one of the two (a key that declares no class is
    an identity key: test_a_key_that_declares_no_resume_class_is_an_identity_key)."""
    identity, free = set(ckpt.RESUME_IDENTITY_KEYS), set(ckpt.RESUME_FREE_KEYS)
    assert identity | free == set(config_lib.config_keys()) and not identity & free
    # issue 25: what picks the kept adapter or the stopping step is identity; the cadence is not
    assert {"data.eval_split", "data.max_eval_samples", "eval.early_stopping_patience"} <= identity
    assert {"eval.every", "checkpoint.every", "train.log_every", "tracking.wandb.project", "pipeline"} <= free


@dataclass
class GrownTrain(config_lib.TrainConfig):
    new_knob: int = 1  # a key added without key(...): it declares no resume class


@dataclass
class GrownConfig(config_lib.RunConfig):
    train: GrownTrain = field(default_factory=GrownTrain)


def test_a_key_that_declares_no_resume_class_is_an_identity_key(tmp_path, monkeypatch):
    info = config_lib.key_info("train.new_knob", GrownConfig)
    assert (info.resume, info.declared, info.before) == ("identity", False, 1)
    assert config_lib.key_info("train.lr", GrownConfig).declared
    # through the resume path: a grown config whose new key changed is refused, naming it
    monkeypatch.setattr(config_lib, "RunConfig", GrownConfig)
    folder = identity_checkpoint(
        tmp_path, ckpt.resume_identity(config_lib.to_dict(GrownConfig()), ["a", "b"])
    )
    grown = GrownConfig()
    grown.train.new_knob = 2
    keeper, _ = checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape("train.new_knob: checkpoint 1, now 2")):
        keeper.resume(folder, ckpt.resume_identity(config_lib.to_dict(grown), ["a", "b"]))


def identity_checkpoint(tmp_path: Path, identity: dict) -> Path:
    folder = tmp_path / "checkpoints" / "step-2"
    folder.mkdir(parents=True, exist_ok=True)
    files.atomic_write_json(folder / ckpt.TRAINER_STATE, {"identity": identity})
    return folder


BASE_CONFIG = {
    "seed": 42,
    "model": {"name": "m", "mode": "lora"},
    "lora": {"r": 8, "target_modules": None},
    "data": {"path": "d", "keep_labels": None, "max_train_samples": None},
    "train": {"batch_size": 8, "grad_accum": 1, "loss": "ce"},
}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"world_size": 2}, "world_size: checkpoint 1, now 2"),
        ({"data.train_fingerprint": "f2"}, "data.train_fingerprint: checkpoint 'f1', now 'f2'"),
        ({"train.batch_size": 16}, "train.batch_size: checkpoint 8, now 16"),
        ({"train.grad_accum": 2}, "train.grad_accum: checkpoint 1, now 2"),
        ({"seed": 7}, "seed: checkpoint 42, now 7"),
        ({"data.max_train_samples": 50}, "data.max_train_samples: checkpoint None, now 50"),
        ({"train.loss": "focal"}, "train.loss: checkpoint 'ce', now 'focal'"),  # a key another branch adds
    ],
    ids=["world_size", "fingerprint", "batch_size", "grad_accum", "seed", "subset", "loss"],
)
def test_a_resume_with_another_batch_size_world_size_seed_or_data_is_refused_naming_it(
    tmp_path, change, expected
):
    import copy

    def identity(overrides: dict) -> dict:
        config = copy.deepcopy(BASE_CONFIG)
        for key, value in overrides.items():
            if key in ("world_size", "data.train_fingerprint"):
                continue
            section, _, name = key.rpartition(".")
            (config[section] if section else config)[name] = value
        return ckpt.resume_identity(
            config,
            ["a", "b"],
            world_size=overrides.get("world_size", 1),
            train_fingerprint=overrides.get("data.train_fingerprint", "f1"),
        )

    folder = identity_checkpoint(tmp_path, identity({}))
    keeper, _ = checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        keeper.resume(folder, identity(change))


def full_identity(**changes: object) -> dict:
    """The resume identity of the default config with `changes` (dotted key -> value)."""
    tree = config_lib.to_dict(config_lib.RunConfig())
    for key, value in changes.items():
        *sections, name = key.split(".")
        node = tree
        for section in sections:
            node = node[section]
        node[name] = value
    return ckpt.resume_identity(tree, ["a", "b"], world_size=1, train_fingerprint="f1")


@pytest.mark.parametrize(
    ("key", "before", "other"),
    [
        ("train.mask_dropout", False, True),  # before the key, torch's dropout ran
        ("eval.tune_thresholds", "none", "auto"),
        ("data.eval_split", "validation", "test"),  # recorded since it became an identity key
        ("train.precision", "no", "bf16"),  # the default before `auto`
    ],
)
def test_a_config_key_a_checkpoint_does_not_record_counts_as_its_before_value(
    tmp_path, monkeypatch, key, before, other
):
    assert config_lib.key_info(key).before == before
    old = full_identity(**{key: before})
    del old[key]  # written before the key was recorded
    folder = identity_checkpoint(tmp_path, old)
    keeper, lines = checkpointer(tmp_path)
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda acc, path, trust_unsigned: {"global_step": 2})
    expected = f"{key}: checkpoint does not record it (counts as {before!r}), now {other!r}"
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        keeper.resume(folder, full_identity(**{key: other}))
    assert keeper.resume(folder, full_identity(**{key: before}))["global_step"] == 2
    assert not any("does not record" in line for line in lines), lines  # accepted silently


def test_what_is_not_a_config_key_and_not_recorded_is_reported_not_compared(tmp_path, monkeypatch):
    old = full_identity()
    del old["world_size"]  # written before the world size was recorded
    folder = identity_checkpoint(tmp_path, old)
    keeper, lines = checkpointer(tmp_path)
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda acc, path, trust_unsigned: {"global_step": 2})
    assert keeper.resume(folder, full_identity())["global_step"] == 2
    assert any("does not record world_size;" in line for line in lines), lines


def test_with_early_stopping_the_evaluation_cadence_is_part_of_the_identity(tmp_path):
    """The patience counts evaluations: another eval.every would stop the run at another step."""
    assert "eval.every" not in full_identity(**{"eval.every": 5})
    stopping = {"eval.early_stopping_patience": 2}
    folder = identity_checkpoint(tmp_path, full_identity(**stopping, **{"eval.every": 5}))
    keeper, _ = checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=re.escape("eval.every: checkpoint 5, now 3")):
        keeper.resume(folder, full_identity(**stopping, **{"eval.every": 3}))


def test_resume_drops_metric_lines_logged_after_the_checkpoint(tmp_path):
    keeper, _ = checkpointer(tmp_path)
    for step in (2, 4, 6):
        keeper.append_metrics({"step": step, "split": "train"})
    keeper._trim_metrics(4)
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4]


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    files.atomic_write_json(path, {"v": 1})

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", fail)
    with pytest.raises(CheckpointError, match="no space left"):
        files.atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_manifest_names_a_missing_truncated_or_altered_file(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"12345678")
    (tmp_path / "b.json").write_text("{}")
    ckpt.write_manifest(tmp_path)
    ckpt.verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"1234")
    with pytest.raises(CheckpointError, match="a.bin has 4 bytes.*truncated"):
        ckpt.verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"12345679")
    with pytest.raises(CheckpointError, match="a.bin does not match its checksum"):
        ckpt.verify_manifest(tmp_path)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(CheckpointError, match="a.bin is missing"):
        ckpt.verify_manifest(tmp_path)


def test_an_existing_run_is_not_overwritten_without_asking(tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2})]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    assert (
        "already holds a run" in capsys.readouterr().err
        and "resume=auto" in capsys.readouterr().err + "resume=auto"
    )
    assert main([*args, "overwrite=true"]) == 0


def test_resume_auto_never_replaces_a_finished_run_without_checkpoints(tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "done"
    args = ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2})]
    assert main(args) == 0
    shutil.rmtree(out / "checkpoints")
    capsys.readouterr()
    assert main([*args, "resume=auto"]) == 2
    assert "holds a finished run but no complete checkpoint" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").exists() and (out / "summary.json").exists()


# --- signed manifests ---------------------------------------------------------------------------------


def forge_manifest(folder: Path, monkeypatch, attacker_key: Path) -> None:
    """Rewrite `folder`'s manifest to match its files, as someone without this user's key can."""
    with monkeypatch.context() as patched:
        patched.setenv(signing.KEY_ENV, str(attacker_key))
        ckpt.write_manifest(folder)


def test_a_manifest_is_signed_and_one_without_this_users_signature_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "step-2"
    folder.mkdir()
    (folder / "optimizer.bin").write_bytes(b"state")
    ckpt.write_manifest(folder)
    ckpt.verify_manifest(folder)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    assert set(manifest["signature"]) == {"hmac_sha256", "key_id"}

    forge_manifest(folder, monkeypatch, tmp_path / "attacker.key")
    with pytest.raises(
        UntrustedCheckpointError, match=r"signed with another key.*checkpoint.trust_unsigned=true"
    ):
        ckpt.verify_manifest(folder)
    ckpt.verify_manifest(folder, trust_unsigned=True)  # the files still match: integrity holds

    unsigned = {k: v for k, v in json.loads((folder / ckpt.MANIFEST).read_text()).items() if k != "signature"}
    files.atomic_write_json(folder / ckpt.MANIFEST, unsigned)  # as written before manifests were signed
    with pytest.raises(UntrustedCheckpointError, match=r"is not signed.*checkpoint.trust_unsigned=true"):
        ckpt.verify_manifest(folder)

    ckpt.write_manifest(folder)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"]["optimizer.bin"]["sha256"] = "0" * 64  # edited after signing, by hand
    files.atomic_write_json(folder / ckpt.MANIFEST, manifest)
    with pytest.raises(UntrustedCheckpointError, match="altered after it was signed"):
        ckpt.verify_manifest(folder)


def test_resume_auto_refuses_an_unsigned_newest_checkpoint_instead_of_falling_back(tmp_path, monkeypatch):
    """An unsigned checkpoint is not damaged: skipping it (and maybe starting fresh, which clears the
    run) would hide it. The claim fails with one error naming the opt-in, and changes nothing."""
    for step in (2, 4):
        folder = tmp_path / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        files.atomic_write_json(folder / ckpt.TRAINER_STATE, {"global_step": step})
        ckpt.write_manifest(folder)
    forge_manifest(tmp_path / "checkpoints" / "step-4", monkeypatch, tmp_path / "attacker.key")
    keeper, _ = checkpointer(tmp_path, resume="auto")
    with pytest.raises(UntrustedCheckpointError, match="step-4 is signed with another key"):
        keeper.claim()
    assert (tmp_path / "checkpoints" / "step-4").is_dir() and not (tmp_path / ".lock").exists()
    trusting = ckpt.Checkpointer(
        OneProcess(), tmp_path, "auto", False, None, 2, echo=print, trust_unsigned=True
    )
    assert trusting.claim() == tmp_path / "checkpoints" / "step-4"
    trusting.release()


def test_another_node_verifies_the_checkpoint_it_loads(tmp_path, monkeypatch):
    """The main process verified the checkpoint it chose; the first process of every other node checks
    it too (each rank loads its own files), and with its own copy of the key."""

    class OtherNode(OneProcess):
        is_main_process = False

    folder = tmp_path / "checkpoints" / "step-2"
    folder.mkdir(parents=True)
    files.atomic_write_json(folder / ckpt.TRAINER_STATE, {"global_step": 2})
    ckpt.write_manifest(folder)
    keeper = ckpt.Checkpointer(OtherNode(), tmp_path, None, False, None, 2, echo=print)
    monkeypatch.setattr(ckpt, "load_checkpoint", lambda acc, path, trust_unsigned: {"global_step": 2})
    assert keeper.resume(folder, {})["global_step"] == 2
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "this-node-has-no-key"))
    with pytest.raises(
        UntrustedCheckpointError, match="no checkpoint key at .*set SCALELORA_KEY_FILE on every node"
    ):
        keeper.resume(folder, {})


def signed_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "step-2"
    (folder / "pytorch_model").mkdir(parents=True)
    (folder / "pytorch_model" / "mp_rank_00_model_states.pt").write_bytes(b"states")
    (folder / "optimizer.bin").write_bytes(b"state")
    ckpt.write_manifest(folder)
    ckpt.verify_manifest(folder)
    return folder


def test_the_manifest_lists_the_folder_exactly(tmp_path):
    """DeepSpeed globs its model-state files and unpickles every match, so a file the manifest does not
    list is refused (not skipped as damaged), whatever its name, and so are symlinks and other non-files."""
    import os

    folder = signed_folder(tmp_path)
    planted = folder / "pytorch_model" / "mp_rank_!_model_states.pt"
    planted.write_bytes(b"payload")
    with pytest.raises(
        UntrustedCheckpointError, match=re.escape(f"holds {planted}, which its manifest does not list")
    ):
        ckpt.verify_manifest(folder, trust_unsigned=True)
    planted.unlink()

    # a listed name that leads elsewhere: the same bytes, through a symlink to a file or to a folder
    (folder / "optimizer.bin").rename(tmp_path / "elsewhere.bin")
    (folder / "optimizer.bin").symlink_to(tmp_path / "elsewhere.bin")
    with pytest.raises(
        UntrustedCheckpointError, match=re.escape(f"holds {folder / 'optimizer.bin'}, which is a symlink")
    ):
        ckpt.verify_manifest(folder)
    (folder / "optimizer.bin").unlink()
    (tmp_path / "elsewhere.bin").rename(folder / "optimizer.bin")
    (folder / "pytorch_model").rename(tmp_path / "real_model_dir")
    (folder / "pytorch_model").symlink_to(tmp_path / "real_model_dir")
    with pytest.raises(UntrustedCheckpointError, match="pytorch_model, which is a symlink"):
        ckpt.verify_manifest(folder)
    (folder / "pytorch_model").unlink()
    (tmp_path / "real_model_dir").rename(folder / "pytorch_model")

    os.mkfifo(folder / "pipe")
    with pytest.raises(UntrustedCheckpointError, match="pipe, which is not a regular file"):
        ckpt.verify_manifest(folder)
    (folder / "pipe").unlink()
    ckpt.verify_manifest(folder)


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    edit(manifest)
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def set_outside_entry(manifest: dict, tmp_path: Path) -> None:
    (tmp_path / "outside.bin").write_bytes(b"not in the checkpoint")
    manifest["files"]["../outside.bin"] = {
        "size": 21,
        "sha256": ckpt.sha256_file(tmp_path / "outside.bin"),
    }


MALFORMED = [
    # (id, edit of the manifest, trust_unsigned, error class, message)
    (
        "files-a-list",
        lambda m, _: m.update(files=[]),
        True,
        CheckpointError,
        "is corrupt: its files are not a map",
    ),
    (
        "entry-without-size",
        lambda m, _: m["files"]["optimizer.bin"].pop("size"),
        True,
        CheckpointError,
        "is corrupt: its entry for optimizer.bin has no size",
    ),
    (
        "non-ascii-signature",
        lambda m, _: m["signature"].update(hmac_sha256="\u00e9" * 64),
        False,
        UntrustedCheckpointError,
        "has a malformed signature",
    ),
    (
        "name-with-dot-dot",
        set_outside_entry,
        True,
        CheckpointError,
        "is corrupt: it lists '../outside.bin', which is not the name of a file inside the checkpoint folder",
    ),
]


@pytest.mark.parametrize(
    ("edit", "trust", "error", "message"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_a_malformed_manifest_or_signature_is_one_error_line(edit, trust, error, message, tmp_path):
    folder = signed_folder(tmp_path)
    edit_manifest(folder, lambda manifest: edit(manifest, tmp_path))
    with pytest.raises(error, match=re.escape(message)) as raised:
        ckpt.verify_manifest(folder, trust_unsigned=trust)
    # exactly `error`: a plain CheckpointError is skipped by resume=auto as damaged, an untrusted one is not
    assert type(raised.value) is error
    assert "\n" not in str(raised.value) and str(folder) in str(raised.value)


def test_the_key_lives_in_the_users_config_directory_with_mode_600(tmp_path, monkeypatch):
    monkeypatch.delenv(signing.KEY_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert signing.key_path() == tmp_path / "xdg" / "scalelora" / "checkpoint.key"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = signing.key_path()
    assert path == tmp_path / "home" / ".config" / "scalelora" / "checkpoint.key"
    key = signing.load_key(create=True)
    assert len(key) == 32 and (path.stat().st_mode & 0o777) == 0o600
    assert signing.load_key(create=True) == key  # created once, then reused
    path.chmod(0o640)
    with pytest.raises(CheckpointError, match="can be read or written by other users.*chmod 600"):
        signing.load_key(create=False)
    monkeypatch.setenv(signing.KEY_ENV, str(tmp_path / "shared" / "key"))
    assert signing.key_path() == tmp_path / "shared" / "key"


def test_a_checkpoint_holds_only_the_trainable_tensors(finished_tiny_run, tiny_bert):
    """The save hook drops the frozen base: a LoRA checkpoint holds the LoRA and head tensors only."""
    from safetensors.torch import load_file

    from scalelora.config import LoraConfig, ModelConfig
    from scalelora.models import build_model

    (weights,) = (finished_tiny_run / "checkpoints").glob("step-*/model.safetensors")
    saved = load_file(str(weights))
    model = build_model(ModelConfig(name=str(tiny_bert)), LoraConfig(), ["neg", "pos"])
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    total = sum(p.numel() for p in model.parameters())
    assert saved.keys() == trainable.keys()
    assert sum(t.numel() for t in saved.values()) == sum(trainable.values()) < total / 5


@pytest.mark.slow
def test_a_key_problem_stops_every_rank_at_setup_with_one_line(tiny_bert, toy_data, tmp_path):
    """The checkpoint key is checked when the run starts, on the main process, and every rank exits with
    its one-line error before step 1, rather than at the first checkpoint (by default, the run's end)."""
    from conftest import accelerate_launch, run_cli

    key = tmp_path / "key"
    key.write_text("00" * signing.KEY_BYTES + "\n")
    key.chmod(0o640)  # readable by the group: others could sign checkpoints as this user
    out = tmp_path / "out"
    result = run_cli(
        "scalelora.train",
        ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 4})],
        env={signing.KEY_ENV: str(key)},
        launcher=accelerate_launch(2, "cpu_2proc.yaml"),
    )
    # torchrun reports each rank's exit code (and ends with a summary of its own). Once one rank has exited
    # with 2, torchrun stops the other with SIGTERM (-15), which may reach it before or after it printed its
    # error line: a race of the launcher, not of scalelora (CI has seen both). So: every rank that exited 2
    # printed the line, a rank stopped by the launcher may have, and no rank printed anything else
    codes = re.findall(r"exitcode\s*: (-?\d+) ", result.stderr)
    assert result.returncode != 0 and len(codes) == 2, result.stderr
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    errors = [line for line in result.stderr.splitlines() if line.startswith("scalelora: error:")]
    assert codes.count("2") <= len(errors) <= 2 and len(set(errors)) == 1, (codes, errors)  # the same line
    assert f"chmod 600 {key}" in errors[0]
    assert "step 1" not in result.stderr and not (out / "metrics.jsonl").exists()


def test_a_key_that_cannot_be_created_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv(signing.KEY_ENV, str(blocker / "checkpoint.key"))  # its folder cannot be made
    with pytest.raises(
        CheckpointError, match=f"cannot create the checkpoint key at {blocker}.*set {signing.KEY_ENV}"
    ):
        signing.check_key()


# --- train.compile between save and resume, and strict loading -------------------------------------------

# dynamo's `eager` backend: torch.compile's wrapper and its names, through Accelerate's compile, without
# inductor's minute of compiling on CPU
EAGER_DYNAMO = {"ACCELERATE_DYNAMO_BACKEND": "EAGER"}
COMPILED_RUN = {"train.max_steps": 2, "train.compile": "true"}


@pytest.fixture(scope="module")
def compiled_tiny_run(tiny_bert, toy_data, tmp_path_factory) -> Path:
    """A finished 2-step run with train.compile=true (read-only: copy it before changing anything)."""
    from scalelora.trainer import run_training

    out = tmp_path_factory.mktemp("compiled") / "run"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in EAGER_DYNAMO.items():
            patch.setenv(name, value)
        summary = run_training(
            config_lib.load_config("quickstart", tiny_overrides(tiny_bert, toy_data, out, **COMPILED_RUN))
        )
    assert summary["compiled"] is True
    return out


def saved_weights(run: Path) -> tuple[Path, dict]:
    """The newest checkpoint's weights file and its tensors."""
    from safetensors.torch import load_file

    newest = ckpt.checkpoint_dirs(run / "checkpoints")[-1] / "model.safetensors"
    return newest, load_file(str(newest))


def test_a_compiled_run_saves_checkpoint_and_adapter_under_the_models_own_names(compiled_tiny_run):
    """torch.compile's wrapper prefixes names with `_orig_mod.`: a model loaded without it matches none."""
    from safetensors.torch import load_file

    _, checkpoint = saved_weights(compiled_tiny_run)
    adapter = load_file(str(compiled_tiny_run / "adapter" / "adapter_model.safetensors"))
    for tensors in (checkpoint, adapter):
        assert tensors and not [key for key in tensors if "_orig_mod" in key]


def resumed_trainer(run: Path, tiny_bert, toy_data, compile_on: bool, **extra):
    from scalelora.trainer import Trainer

    overrides = tiny_overrides(
        tiny_bert, toy_data, run, **{**extra, "train.compile": str(compile_on).lower()}
    )
    return Trainer(config_lib.load_config("quickstart", [*overrides, "resume=auto"]))


@pytest.mark.parametrize("saved_compiled", [False, True], ids=["eager-then-compiled", "compiled-then-eager"])
def test_a_resume_with_train_compile_toggled_restores_every_trained_weight(
    saved_compiled, finished_tiny_run, compiled_tiny_run, tiny_bert, toy_data, tmp_path, monkeypatch
):
    """train.compile is free on resume: the resumed model holds exactly the checkpoint's weights either
    way (before, the names differed by `_orig_mod.`, and strict=False restored nothing, silently)."""
    from scalelora.runtime import unwrap_model

    for name, value in EAGER_DYNAMO.items():
        monkeypatch.setenv(name, value)
    source = compiled_tiny_run if saved_compiled else finished_tiny_run
    run = shutil.copytree(source, tmp_path / "run")
    extra = (
        COMPILED_RUN if saved_compiled else {"tracking.report_to": "wandb", "tracking.wandb.mode": "disabled"}
    )
    _, saved = saved_weights(run)
    saved = {key.replace("_orig_mod.", ""): value for key, value in saved.items()}
    trainer = resumed_trainer(run, tiny_bert, toy_data, compile_on=not saved_compiled, **extra)
    try:
        trainer.setup()
        assert trainer.compiled is not saved_compiled
        model = unwrap_model(trainer.model)
        trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
        assert trainable.keys() == saved.keys()
        for name, value in trainable.items():
            assert torch.equal(value, saved[name]), f"{name} was not restored"
    finally:
        trainer.close()


def rewrite_checkpoint_weights(run: Path, edit) -> Path:
    """The newest checkpoint with its weights file edited by `edit` (tensors -> tensors), re-signed."""
    from safetensors.torch import save_file

    path, tensors = saved_weights(run)
    save_file(edit(tensors), str(path))
    ckpt.write_manifest(path.parent)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda tensors: {f"_orig_mod.{key}": value for key, value in tensors.items()},
            r"(\d+) of its tensors match no weight of this model \(first: _orig_mod\.base_model.*"
            r"\1 trainable weights of this model are not in it",
        ),
        (
            lambda tensors: {key: value for key, value in tensors.items() if "lora_B" not in key},
            r"does not fit this run's model: 4 trainable weights of this model are not in it "
            r"\(first: base_model\.model\.bert\.encoder\.layer\.0\.attention\.self\.query\.lora_B",
        ),
    ],
    ids=["names-match-nothing", "a-trainable-weight-missing"],
)
def test_a_checkpoint_whose_weights_do_not_match_the_model_is_refused(
    edit, message, finished_tiny_run, tiny_bert, toy_data, tmp_path
):
    """Accelerate loads the trainable-only weights with strict=False; the load is checked strictly over
    the trainable weights: a tensor that matches nothing, or a trainable weight not in the file, is a
    one-line error naming the file, never a run that goes on with the weights it had."""
    run = shutil.copytree(finished_tiny_run, tmp_path / "run")
    path = rewrite_checkpoint_weights(run, edit)
    trainer = resumed_trainer(
        run,
        tiny_bert,
        toy_data,
        compile_on=False,
        **{"tracking.report_to": "wandb", "tracking.wandb.mode": "disabled"},
    )
    try:
        with pytest.raises(CheckpointError, match=message) as raised:
            trainer.setup()
    finally:
        trainer.close()
    assert str(raised.value).startswith(f"{path} does not fit this run's model") and "\n" not in str(
        raised.value
    )


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda tensors: {f"_orig_mod.{key}": value for key, value in tensors.items()},
            "1 trainable weights of this model are not in it \\(first: base_model.model.classifier.weight\\)",
        ),
        (
            lambda tensors: {key: value for key, value in tensors.items() if "lora_B" not in key},
            "4 trainable weights of this model are not in it \\(first: base_model.*query.lora_B",
        ),
        (
            lambda tensors: {
                **tensors,
                "base_model.model.bert.pooler.dense.lora_A.weight": torch.ones(8, 32),
            },
            "1 of its tensors match no weight of this model \\(first: base_model.model.bert.pooler.dense",
        ),
    ],
    ids=["names-match-nothing", "a-trainable-weight-missing", "a-tensor-matches-nothing"],
)
def test_restoring_the_best_adapter_is_strict_too(edit, message, tiny_bert, tmp_path):
    """restore_best loads the adapter saved at the best evaluation back; one that does not match the
    model is a one-line error, not a final evaluation of the last weights under the best one's name."""
    from accelerate.utils import DistributedType
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from scalelora.config import LoraConfig, ModelConfig
    from scalelora.models import build_model

    class Accelerator(OneProcess):
        distributed_type = DistributedType.NO

    model = build_model(ModelConfig(name=str(tiny_bert)), LoraConfig(), ["neg", "pos"])
    keeper = ckpt.Checkpointer(Accelerator(), tmp_path, None, False, None, keep_last=2)
    best = {key: torch.full_like(value, 0.5) for key, value in get_peft_model_state_dict(model).items()}
    (tmp_path / "adapter").mkdir()
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file(best, str(weights))
    keeper.restore_best(model)
    restored = get_peft_model_state_dict(model)
    assert all(torch.equal(restored[key], value) for key, value in best.items())
    save_file(edit(best), str(weights))
    with pytest.raises(CheckpointError, match=f"{weights} does not fit this run's model: .*{message}"):
        keeper.restore_best(model)
