"""The run folder: its lock, resume policy, resumable checkpoints, the best adapter, metrics and summary.

Everything is written so a crash never leaves a half-written file or folder as the latest. A resumable checkpoint is `checkpoints/step-N/`: Accelerate's `save_state` (trainable weights in
safetensors, optimizer, scheduler, RNG), `trainer_state.json`, and `manifest.json` (size and
sha256 of every file, signed with this user's key: see `signing.py`) written last. Everything is
first written to `.tmp-step-N/` (mode 0700) and renamed, so a folder named `step-N` with a matching
manifest is complete by construction, and one whose signature verifies was written by this user.
The manifest lists the folder exactly; loading checks each file against it again as it reads it,
and never unpickles code (`safe_load.py`, which states the threat model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from scalelora import safe_load, signing
from scalelora.config import config_keys, dotted_get, key_info, resume_keys
from scalelora.errors import CheckpointError, UntrustedCheckpointError, UserError, one_line
from scalelora.files import atomic_write_json, atomic_write_text, fsync_dir, raise_disk_error, replace_dir
from scalelora.runtime import (
    COMPILED_PREFIX,
    check_on_each_node,
    decide_on_main,
    deepspeed_hidden,
    is_deepspeed,
    model_state_dict,
    unwrap_model,
    without_compiled_prefix,
    zero_stage,
)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


# --- manifest --------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_payload(manifest: dict[str, Any]) -> bytes:
    """The bytes a manifest's signature covers: everything in it but the signature, canonically."""
    body = {key: value for key, value in manifest.items() if key != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def folder_files(folder: Path) -> list[str]:
    """Every file under `folder` but the manifest, as manifest names (`pytorch_model/x.pt`), sorted.

    Raises UntrustedCheckpointError naming the first symlink or special file: a checkpoint holds plain
    files and folders only, and a link would let a listed name read bytes from anywhere.
    """
    names: list[str] = []
    pending = [(folder, "")]
    while pending:
        here, prefix = pending.pop()
        try:
            with os.scandir(here) as listing:
                entries = sorted(listing, key=lambda entry: entry.name)
        except OSError as err:
            raise CheckpointError(f"cannot list {here}: {err.strerror or err}") from None
        for entry in entries:
            name = prefix + entry.name
            if entry.is_symlink():
                kind = "a symlink"
            elif entry.is_dir(follow_symlinks=False):
                pending.append((Path(entry.path), name + "/"))
                continue
            elif entry.is_file(follow_symlinks=False):
                if name != MANIFEST:
                    names.append(name)
                continue
            else:
                kind = "not a regular file"
            raise UntrustedCheckpointError(
                f"checkpoint {folder} holds {folder / name}, which is {kind} (a checkpoint holds plain files "
                "only; planted, or altered after it was written): refused; resume from another checkpoint"
            )
    return sorted(names)


def file_entry(path: Path) -> dict[str, Any]:
    """A manifest entry: the size and sha256 of `path`."""
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def hash_files(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `folder` but the manifest (see `folder_files`)."""
    return {name: file_entry(folder / name) for name in folder_files(folder)}


def write_manifest(folder: Path, files: dict[str, dict[str, Any]] | None = None) -> None:
    """Write `folder/manifest.json` listing `files` (name -> size and sha256), signed with this user's key.

    `save_checkpoint` passes the hashes it took as soon as the files were written, so the signature
    covers what was written, not what the folder holds by the time it is signed. Without `files` the
    folder's files are hashed now (a checkpoint re-signed by hand; the tests' forgeries).
    """
    manifest: dict[str, Any] = {
        "files": hash_files(folder) if files is None else files,
        "written_at": time.time(),
    }
    key = signing.load_key(create=True)
    manifest["signature"] = {
        "hmac_sha256": signing.sign(manifest_payload(manifest), key),
        "key_id": signing.key_id(key),
    }
    atomic_write_json(folder / MANIFEST, manifest)


TRUST_UNSIGNED_FIX = "resume it only if you trust where it came from, with checkpoint.trust_unsigned=true"
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def check_signature(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise UntrustedCheckpointError unless the manifest carries this user's key's HMAC."""
    signature = manifest.get("signature")
    if not isinstance(signature, dict) or not isinstance(signature.get("hmac_sha256"), str):
        raise UntrustedCheckpointError(
            f"checkpoint {folder} is not signed (written by another user or machine, by a scalelora before "
            "signed checkpoints, or altered), so its training state may not be yours; "
            f"{TRUST_UNSIGNED_FIX}"
        )
    try:
        key = signing.load_key(create=False)
    except CheckpointError as err:
        raise UntrustedCheckpointError(f"checkpoint {folder}: {err}") from None
    mac = signature["hmac_sha256"]
    if not SHA256_HEX.fullmatch(mac) or not signing.signature_matches(manifest_payload(manifest), mac, key):
        if not SHA256_HEX.fullmatch(mac):
            problem = "has a malformed signature (not 64 hex digits)"
        elif signature.get("key_id") == signing.key_id(key):
            problem = "has a manifest altered after it was signed"
        else:
            problem = f"is signed with another key than this user's ({signing.key_path()})"
        raise UntrustedCheckpointError(
            f"checkpoint {folder} {problem}: it may not have been written by you, so its training state may "
            f"not be yours; {TRUST_UNSIGNED_FIX}"
        )


def manifest_entry_problem(name: Any, entry: Any) -> str | None:
    """What is wrong with one `files` entry of a manifest (None: nothing)."""
    parts = name.split("/") if isinstance(name, str) else [""]
    if (
        not isinstance(name, str)
        or "\x00" in name
        or any(part in ("", ".", "..") for part in parts)
        or name == MANIFEST
    ):
        return f"it lists {name!r}, which is not the name of a file inside the checkpoint folder"
    if not isinstance(entry, dict):
        return f"its entry for {name} is not an object"
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return f"its entry for {name} has no size (a whole number of bytes)"
    if not isinstance(entry.get("sha256"), str) or not SHA256_HEX.fullmatch(entry["sha256"]):
        return f"its entry for {name} has no sha256 (64 hex digits)"
    return None


def read_manifest(folder: Path, trust_unsigned: bool = False) -> dict[str, dict[str, Any]]:
    """The files `folder/manifest.json` lists (name -> size, sha256), once its signature (unless
    `trust_unsigned`), its form and the folder's contents check out; the files are not hashed here.

    The manifest lists the folder exactly. Raises UntrustedCheckpointError when the signature is
    missing or not this user's, or the folder holds an unlisted file, a symlink or a special file
    (planted: never skipped as damaged); CheckpointError when the manifest is missing or malformed, or a
    listed file is missing or of another size.
    """
    manifest_path = folder / MANIFEST
    if not os.path.lexists(manifest_path):
        raise CheckpointError(f"{folder} has no {MANIFEST}: it is incomplete (a save was interrupted)")
    present = set(folder_files(folder))  # refuses a symlinked manifest before it is read
    try:
        with os.fdopen(safe_load.open_under(folder, MANIFEST), "rb") as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{manifest_path} is corrupt") from None
    if not isinstance(manifest, dict) or "files" not in manifest:
        raise CheckpointError(f"{manifest_path} is corrupt")
    if not trust_unsigned:
        check_signature(folder, manifest)
    files = manifest["files"]
    if not isinstance(files, dict) or not files:
        raise CheckpointError(
            f"{manifest_path} is corrupt: its files are not a map of names to sizes and checksums"
        )
    for name, entry in files.items():
        if problem := manifest_entry_problem(name, entry):
            raise CheckpointError(f"{manifest_path} is corrupt: {problem}")
    for name in sorted(present):
        if name not in files:
            raise UntrustedCheckpointError(
                f"checkpoint {folder} holds {folder / name}, which its manifest does not list (planted, or added "
                "after the checkpoint was written): refused; resume from another checkpoint, or delete that file "
                "if you know where it came from"
            )
    for name, expected in files.items():
        path = folder / name
        if name not in present:
            raise CheckpointError(f"{path} is missing from the checkpoint")
        if path.stat().st_size != expected["size"]:
            raise CheckpointError(
                f"{path} has {path.stat().st_size} bytes, the manifest says {expected['size']} (truncated?)"
            )
    return files


def verify_manifest(folder: Path, trust_unsigned: bool = False) -> dict[str, dict[str, Any]]:
    """`read_manifest`, then every listed file hashed against it; returns the listed files.

    Raises UntrustedCheckpointError when the signature is missing or is not this user's, or the folder
    holds anything the manifest does not list, and CheckpointError naming the first missing,
    truncated or altered file. Loading checks each file again as it reads it (`safe_load`).
    """
    files = read_manifest(folder, trust_unsigned)
    listed = safe_load.ListedFiles(folder, files)
    for name in files:
        listed.open(folder / name).close()
    return files


# --- resumable checkpoints -------------------------------------------------------------------------


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete-looking `step-N` folders, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_valid_checkpoint(root: Path, log: Any = print, trust_unsigned: bool = False) -> Path | None:
    """The newest checkpoint whose manifest verifies; a corrupt one is reported and skipped.

    Raises UntrustedCheckpointError for an unsigned or foreign one: it is not damaged, and falling
    back past it (or starting fresh, which clears the run) would hide it.
    """
    for path in reversed(checkpoint_dirs(root)):
        try:
            verify_manifest(path, trust_unsigned)
        except UntrustedCheckpointError:
            raise
        except CheckpointError as err:
            log(
                f"scalelora: warning: skipping checkpoint {path.name}: {err}; falling back to the previous one"
            )
            continue
        return path
    return None


def trainable_only_save_hook(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
    """Accelerate save hook: keep only trainable tensors (LoRA + head), not the frozen base, in each
    checkpoint, under the model's own names (never torch.compile's `_orig_mod.`). `load_checkpoint`
    loads them strictly over the trainable weights."""
    for i, model in enumerate(models):
        trainable = {name.replace(COMPILED_PREFIX, "") for name in trainable_names(model)}
        if i < len(weights):
            weights[i] = {k: v for k, v in without_compiled_prefix(weights[i]).items() if k in trainable}


def trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def absent_trainable(model: torch.nn.Module, missing: Iterable[str]) -> list[str]:
    """The trainable weights of `model` that a load left as they were (its `missing` names), sorted; a
    weight tied under several names counts as loaded when one of them was."""
    missing = set(missing)
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            names.setdefault(id(param), []).append(name)
    return sorted(aliases[0] for aliases in names.values() if all(name in missing for name in aliases))


def check_weights_loaded(source: Path, absent: list[str], unexpected: Iterable[str]) -> None:
    """Raise CheckpointError unless a load from `source` matched: every tensor in it is a weight of the
    model (no `unexpected` name) and every trainable weight came from it (none `absent`). A load that
    matches nothing is an error, never a run that goes on with the weights it had."""
    stray = sorted(unexpected)
    if not absent and not stray:
        return
    parts = []
    if stray:
        parts.append(f"{len(stray)} of its tensors match no weight of this model (first: {stray[0]})")
    if absent:
        parts.append(f"{len(absent)} trainable weights of this model are not in it (first: {absent[0]})")
    raise CheckpointError(
        f"{source} does not fit this run's model: {'; '.join(parts)}; it was written for another model or "
        "LoRA setting, or by a scalelora that compiled the model before `prepare` (names starting with "
        f"{COMPILED_PREFIX}); resume from a checkpoint of this run, or start over with overwrite=true"
    )


def private_dir(path: Path) -> tuple[int, int]:
    """Create `path` as a folder only this user can enter (0700 whatever the umask); its (device, inode)."""
    os.mkdir(path, 0o700)
    os.chmod(path, 0o700)
    info = os.lstat(path)
    return info.st_dev, info.st_ino


def check_private(path: Path, identity: tuple[int, int]) -> None:
    """Raise CheckpointError unless `path` is still the private folder `private_dir` made."""
    try:
        info = os.lstat(path)
    except OSError:
        info = None
    if (
        info is None
        or not stat.S_ISDIR(info.st_mode)
        or (info.st_dev, info.st_ino) != identity
        or info.st_uid != os.getuid()
        or info.st_mode & 0o077
    ):
        raise CheckpointError(
            f"{path} was replaced, or opened to other users, while the checkpoint was written, so it is not "
            f"signed; check who else can write to {path.parent}, and resume with resume=auto"
        )


def save_checkpoint(
    accelerator: Any, root: Path, step: int, trainer_state: dict[str, Any], keep_last: int
) -> Path:
    """Collective: every rank calls it. Returns the final folder `root/step-N`.

    The engines write into a folder only this user can enter, and the files are hashed as soon as
    they return: the signature covers what was written, and nobody else can add or change a file
    before it is signed (see `safe_load` for the threat model).
    """
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    identity = (0, 0)
    if accelerator.is_main_process:
        if tmp.is_symlink():
            tmp.unlink()
        elif tmp.exists():
            shutil.rmtree(tmp)
        root.mkdir(parents=True, exist_ok=True)
        identity = private_dir(tmp)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)  # give back what the partial save took
        raise_disk_error(tmp, err)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = hash_files(tmp)
        check_private(tmp, identity)
        atomic_write_json(tmp / TRAINER_STATE, trainer_state)
        files[TRAINER_STATE] = file_entry(tmp / TRAINER_STATE)
        write_manifest(tmp, files)  # last: its presence marks the checkpoint complete
        check_private(tmp, identity)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint. Raises CheckpointError when it is missing or not JSON."""
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(
            f"{path / TRAINER_STATE} is missing or corrupt; use an earlier checkpoint"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / TRAINER_STATE} is corrupt; use an earlier checkpoint")
    return state


def load_checkpoint(accelerator: Any, path: Path, trust_unsigned: bool = False) -> dict[str, Any]:
    """Load a checkpoint `Checkpointer.resume` has verified into the prepared objects; return its trainer state.

    The manifest is read and checked again (signature unless `trust_unsigned`, exact listing), and
    every file is checked against it as it is opened and loaded without running code (`safe_load`).
    Raises CheckpointError for one that does not load, or whose weights exist only as pickle.
    """
    uses_deepspeed = is_deepspeed(accelerator)
    listed = safe_load.ListedFiles(path, read_manifest(path, trust_unsigned))
    if not uses_deepspeed and not any(path.glob("*.safetensors")) and any(path.glob("*.bin")):
        raise CheckpointError(
            f"{path} holds its weights only as pickle (.bin), which can run code when loaded; "
            "scalelora resumes from safetensors checkpoints only: re-save it with safe_serialization=True"
        )
    # our save hook keeps only trainable tensors, hence strict=False; DeepSpeed saves the whole module
    # itself (the hook is not used there) and its load_checkpoint takes no `strict`
    try:
        with safe_load.verified_loading(accelerator, listed, uses_deepspeed) as loads:
            accelerator.load_state(str(path), **({} if uses_deepspeed else {"strict": False}))
    except CheckpointError:
        raise
    except Exception as err:  # torch/safetensors raise several types for foreign or mismatched files
        raise CheckpointError(f"cannot load checkpoint {path}: {one_line(err, 200)}") from None
    if not uses_deepspeed:
        # strict over the trainable weights, which are all the hook saved: Accelerate keeps no result
        for i, model in enumerate(accelerator._models):
            load = next((load for load in loads if load.model is model), None)
            weights = path / f"model{f'_{i}' if i else ''}.safetensors"
            if load is None:
                raise CheckpointError(
                    f"{weights} was not loaded: the checkpoint holds no weights for this model"
                )
            check_weights_loaded(weights, absent_trainable(model, load.missing), load.unexpected)
    try:
        state = json.loads(listed.read_bytes(TRAINER_STATE))
    except ValueError:
        state = None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / TRAINER_STATE} is corrupt; use an earlier checkpoint")
    return state


@contextlib.contextmanager
def gathered_for_write(accelerator: Any, params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Collective: under ZeRO-3 every rank sees the full `params` inside the block, and what rank 0
    writes into them is re-partitioned on exit (a rank-local shard is an empty tensor). No-op otherwise."""
    if zero_stage(accelerator) != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=0):
        yield


# --- adapters and full models ----------------------------------------------------------------------


def check_adapter_weights(folder: Path, r: int) -> int:
    """Raise CheckpointError unless every saved LoRA tensor is non-empty with rank `r` (ZeRO-3 can save 0-size shards)."""
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise CheckpointError(f"{weights_file} was not written")
    tensors = load_file(str(weights_file))
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    if not lora:
        raise CheckpointError(f"{weights_file} holds no LoRA weights")
    for name, tensor in lora.items():
        rank_dim = tensor.shape[0] if "lora_A" in name else tensor.shape[-1]
        if tensor.numel() == 0 or rank_dim != r:
            raise CheckpointError(
                f"{weights_file}: {name} has shape {tuple(tensor.shape)} (expected rank {r}); the save gathered no weights"
            )
    return len(tensors)


def save_model_dir(
    accelerator: Any,
    model: torch.nn.Module,
    final: Path,
    tokenizer: Any,
    extra_files: dict[str, Any],
    lora_r: int | None,
) -> None:
    """Collective: save a PEFT adapter (lora_r set) or a full transformers model into `final`, atomically."""
    state_dict = model_state_dict(accelerator, model)  # gathers ZeRO-3 shards; every rank must call it
    unwrapped = unwrap_model(model)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        try:
            with deepspeed_hidden(not is_deepspeed(accelerator)):
                unwrapped.save_pretrained(
                    str(tmp),
                    state_dict=state_dict,
                    is_main_process=True,
                    save_function=accelerator.save,
                    safe_serialization=True,
                )
            tokenizer.save_pretrained(str(tmp))
            for name, data in extra_files.items():
                atomic_write_json(tmp / name, data)
        except OSError as err:
            raise_disk_error(tmp, err)
        if lora_r is not None:
            check_adapter_weights(tmp, lora_r)
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()


# --- one run per output_dir ------------------------------------------------------------------------


class RunLock:
    """`output_dir/.lock` held by the main process; a lock left by a dead process on this host is taken over."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / ".lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and owner.get("host") == me["host"] and not pid_alive(int(owner.get("pid", -1))):
                    self.path.unlink(missing_ok=True)  # stale: that run crashed
                    continue
                who = f"pid {owner.get('pid')} on {owner.get('host')}" if owner else "another run"
                raise UserError(
                    f"output_dir {self.path.parent} is in use by {who}; wait for it, choose another output_dir, "
                    f"or delete {self.path} if that run is dead"
                ) from None
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return

    def _owner(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- the run folder, as one object the loop asks ----------------------------------------------------

# Config keys a checkpoint must share with the run that resumes it, and keys a resume may change:
# each key declares its class in config.py (`key(..., resume=...)`, the reasons are there); these are
# derived from it. A key that declares none is an identity key.
RESUME_IDENTITY_KEYS = resume_keys("identity")
RESUME_FREE_KEYS = resume_keys("free")
# What a finished or interrupted run leaves in output_dir; a fresh start removes all of it.
ARTIFACTS = (
    "checkpoints",
    "adapter",
    "model",
    "summary.json",
    "metrics.jsonl",
    "config.yaml",
    "report.md",
    "curves.png",
    "reliability.png",
    # a fresh start must not continue the W&B run of the outputs it replaces
    "wandb_run_id.txt",
    "wandb_last_step.txt",
    "predictions",
)
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"


ABSENT = object()


def resume_identity(
    config: dict[str, Any],
    label_names: list[str],
    world_size: int | None = None,
    train_fingerprint: str | None = None,
) -> dict[str, Any]:
    """What a checkpoint must share with this run to be resumed by it: the identity keys of config.py
    (see RESUME_IDENTITY_KEYS) and what is not a config key (labels, world size, the training data).

    Keys absent from `config` are left out. Values are as JSON stores them.
    """
    keys = list(resume_keys("identity"))
    if dotted_get(config, "eval.early_stopping_patience", 0):
        # the patience counts evaluations: at another cadence the run stops at another step
        keys.append("eval.every")
    identity = {key: value for key in keys if (value := dotted_get(config, key, ABSENT)) is not ABSENT}
    identity["labels"] = list(label_names)
    if world_size is not None:
        identity["world_size"] = world_size  # the stream is sharded by rank, and the loss normalized over all
    if train_fingerprint is not None:
        identity["data.train_fingerprint"] = train_fingerprint  # the training examples themselves
    return json.loads(json.dumps(identity))


def compare_identity(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(what changed, as "key: checkpoint X, now Y"; keys the checkpoint does not record that cannot
    be checked).

    A config key the checkpoint does not record (written before the key existed, or before it was
    compared on resume) counts as its declared `before` value: the behaviour before the key.
    """
    known = set(config_keys())
    changed, unknown = [], []
    for key, value in current.items():
        if key in saved:
            if saved[key] != value:
                changed.append(f"{key}: checkpoint {saved[key]!r}, now {value!r}")
        elif key in known:
            before = json.loads(json.dumps(key_info(key).before))
            if before != value:
                changed.append(f"{key}: checkpoint does not record it (counts as {before!r}), now {value!r}")
        else:
            unknown.append(key)
    return changed, unknown


class Checkpointer:
    """Owns `output_dir`: the run lock, whether and from where to resume, when to write a resumable
    checkpoint and which to keep, the best model, `metrics.jsonl`, `config.yaml` and `summary.json`.

    The loop asks it after every step (`maybe_save(step, last, state, around)`) and hands it plain
    data; it never reads the loop's objects. Methods marked collective are called by every rank; the main process writes.
    """

    def __init__(
        self,
        accelerator: Any,
        run_dir: Path,
        resume: str | None,
        overwrite: bool,
        every: int | None,
        keep_last: int,
        echo: Callable[[str], None] = print,
        trust_unsigned: bool = False,
    ) -> None:
        self.accelerator = accelerator
        self.trust_unsigned = trust_unsigned
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.resume_setting = resume
        self.overwrite = overwrite
        self.every = every
        self.keep_last = keep_last
        self.echo = echo
        self.lock = RunLock(run_dir)
        self.last_saved_step: int | None = None

    # --- claiming the folder -------------------------------------------------------------------

    def claim(self) -> Path | None:
        """Collective. Take the lock and decide where to resume from (None: a fresh start, outputs
        cleared). The main process decides; every rank gets the answer or the same error."""
        found = decide_on_main(self.accelerator, self._decide)
        self.accelerator.wait_for_everyone()
        if found is None and self.resume_setting == "auto":
            self.echo("scalelora: resume=auto found no complete checkpoint; starting fresh")
        return Path(found) if found else None

    def _decide(self) -> str | None:
        # the key signs every checkpoint, by default first at the end of training or at a preemption:
        # a key that cannot be made or is open to other users stops the run now, before step 1
        signing.check_key()
        self.lock.acquire()
        try:
            if self.resume_setting not in (None, "auto"):
                path = Path(self.resume_setting)
                if not path.is_dir():
                    raise CheckpointError(
                        f"resume={self.resume_setting}: no such checkpoint folder (use resume=auto to pick the newest)"
                    )
                try:
                    verify_manifest(path, self.trust_unsigned)
                except UntrustedCheckpointError:
                    raise
                except CheckpointError as err:
                    raise CheckpointError(
                        f"{err}; resume from an earlier checkpoint, or use resume=auto (it skips damaged ones)"
                    ) from None
                return str(path)
            if self.resume_setting == "auto":
                found = latest_valid_checkpoint(self.root, log=self.echo, trust_unsigned=self.trust_unsigned)
                if found is None:
                    if (self.run_dir / SUMMARY_FILE).exists() and not self.overwrite:
                        # never trade a finished run for a fresh start just because its checkpoints are gone
                        raise CheckpointError(
                            f"resume=auto: {self.run_dir} holds a finished run but no complete checkpoint to "
                            "resume from; pass overwrite=true to start over, or another output_dir"
                        )
                    self._clear_outputs()
                return str(found) if found else None
            existing = [name for name in ARTIFACTS if (self.run_dir / name).exists()]
            if existing and not self.overwrite:
                raise UserError(
                    f"output_dir {self.run_dir} already holds a run ({', '.join(existing)}); pass resume=auto to "
                    "continue it, overwrite=true to start over, or another output_dir"
                )
            self._clear_outputs()
            return None
        except BaseException:
            self.lock.release()
            raise

    def _clear_outputs(self) -> None:
        for name in ARTIFACTS:
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def release(self) -> None:
        self.lock.release()

    # --- resumable checkpoints -----------------------------------------------------------------

    def resume(self, path: Path, identity: dict[str, Any]) -> dict[str, Any]:
        """Collective. Load checkpoint `path` into the prepared objects and return its trainer state, with
        this resume's step added to its `resumed_at` (the steps a run was resumed at, in order).

        Raises CheckpointError when it is from another config, data, seed or world size (see
        RESUME_IDENTITY_KEYS; compared before loading weights: another config's tensors would fail
        with a shape error) or cannot be loaded.
        """
        self._verify_on_every_node(path)
        changed, unknown = compare_identity(read_trainer_state(path).get("identity", {}), identity)
        if changed:
            raise CheckpointError(
                f"checkpoint {path} is from another config ({'; '.join(changed)}); use its original config "
                "(the same data, seed and number of processes), or start over with overwrite=true or another output_dir"
            )
        if unknown:
            # written by an older scalelora; config keys it lacks were compared as their `before` values,
            # but the world size or data fingerprint has none: it can only be reported
            self.echo(
                f"scalelora: warning: checkpoint {path} does not record {', '.join(unknown)}; "
                "resuming on the assumption that they did not change"
            )
        state = load_checkpoint(self.accelerator, path, self.trust_unsigned)
        step = int(state.get("global_step", 0))
        self.last_saved_step = step
        self._trim_metrics(step)
        self.echo(f"scalelora: resumed from {path} at step {step}")
        return {**state, "resumed_at": [*state.get("resumed_at", []), step]}

    def _verify_on_every_node(self, path: Path) -> None:
        """Collective. One process per node verifies the checkpoint (signature and files) as that node
        sees it, since each rank loads its own files; the main process did when it chose it. Every rank
        raises the first error any of them found, so none is left waiting in a collective."""
        check_on_each_node(
            self.accelerator, lambda: verify_manifest(path, self.trust_unsigned), skip_main=True
        )

    def _trim_metrics(self, step: int) -> None:
        """Drop metric lines logged after the checkpoint, so a resumed run never repeats or goes back in steps."""
        path = self.run_dir / METRICS_FILE
        if self.accelerator.is_main_process and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step
            ]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def due(self, step: int, last: bool) -> bool:
        """Whether `maybe_save` writes a checkpoint at this step: every `checkpoint.every` steps and at the
        last step, never twice for one step."""
        periodic = bool(self.every) and step % self.every == 0
        return (periodic or last) and self.last_saved_step != step

    def maybe_save(
        self,
        step: int,
        last: bool,
        state: Callable[[], dict[str, Any]],
        around: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> Path | None:
        """Collective. Save every `checkpoint.every` steps and once at the last step (unless that step
        was just saved). Only when saving, it enters `around()` (the loop times the save there) and
        calls `state` inside it (it may sync the device)."""
        if not self.due(step, last):
            return None
        with around():
            return self.save(step, state())

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Collective. Write `checkpoints/step-N` now (on preemption, a halt, or when due)."""
        path = save_checkpoint(self.accelerator, self.root, step, state, self.keep_last)
        self.last_saved_step = step
        return path

    # --- the model a user keeps ----------------------------------------------------------------

    def model_dir(self, peft_model: bool) -> Path:
        return self.run_dir / ("adapter" if peft_model else "model")

    def save_model(
        self, model: torch.nn.Module, tokenizer: Any, meta: dict[str, Any], lora_r: int | None
    ) -> Path:
        """Collective. `adapter/` (LoRA, `lora_r` set) or `model/` (full, head_only), loadable with PEFT
        or transformers alone, with the extra JSON files in `meta` (file name -> content)."""
        target = self.model_dir(lora_r is not None)
        save_model_dir(self.accelerator, model, target, tokenizer, meta, lora_r)
        return target

    def restore_best(self, model: torch.nn.Module) -> None:
        """Collective. Load the weights saved at the best evaluation back into `model`."""
        from safetensors.torch import load_file

        acc = self.accelerator
        acc.wait_for_everyone()
        unwrapped = unwrap_model(model)
        if hasattr(unwrapped, "peft_config"):
            from peft import set_peft_model_state_dict

            weights = self.model_dir(True) / "adapter_model.safetensors"
            trainable = [p for p in unwrapped.parameters() if p.requires_grad]
            with gathered_for_write(acc, trainable):  # ZeRO-3 shards are empty tensors
                try:
                    result = set_peft_model_state_dict(unwrapped, load_file(str(weights)))
                except KeyError as err:  # PEFT looks a modules_to_save weight up by its name
                    check_weights_loaded(weights, [str(err.args[0])], [])
                absent = absent_trainable(unwrapped, result.missing_keys)
            check_weights_loaded(weights, absent, result.unexpected_keys)
            return
        # transformers 5 dropped modeling_utils.load_sharded_checkpoint: read the shards ourselves
        shards = sorted(self.model_dir(False).glob("model*.safetensors"))
        missing, unexpected = set(unwrapped.state_dict()), set()
        with gathered_for_write(acc, unwrapped.parameters()):
            for shard in shards:
                result = unwrapped.load_state_dict(load_file(str(shard)), strict=False)
                missing &= set(result.missing_keys)
                unexpected |= set(result.unexpected_keys)
            absent = absent_trainable(unwrapped, missing)
        check_weights_loaded(self.model_dir(False), absent, unexpected)

    # --- small files ---------------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One line of `metrics.jsonl` (main process only)."""
        if self.accelerator.is_main_process:
            with (self.run_dir / METRICS_FILE).open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def write_text(self, name: str, text: str) -> None:
        if self.accelerator.is_main_process:
            atomic_write_text(self.run_dir / name, text)

    def write_summary(self, summary: dict[str, Any]) -> Path:
        path = self.run_dir / SUMMARY_FILE
        if self.accelerator.is_main_process:
            atomic_write_json(path, summary)
        return path
