"""Reading a checkpoint's files so that none can run code, and each is the very file its manifest lists.

Threat model: a checkpoint may have been written or altered by anyone who cannot run code as this
user (another user of a shared scratch space, whoever handed over a copied checkpoint, a compromised
job under another account). Loading it must not run their code, and must not load bytes the
manifest does not vouch for. An attacker already running as this user is out of scope: they can
read the signing key and run code directly.

What this module does about it:

- Every file is opened once, through `ListedFiles.open`: only names the manifest lists, no symlink
  anywhere on the path, a regular file, and the size and sha256 of that open file must match before a
  byte of it is deserialized (the hash is of the file descriptor that is then read, so the file
  cannot be swapped between the check and the load).
- Every `torch.load` is `weights_only=True`, with the DeepSpeed types its checkpoints hold allowed
  for the duration of that one load (`torch.serialization.safe_globals`, not the process-wide list,
  which Accelerate resets around its own loads). Anything else is refused with one line naming it.
  This holds with or without a valid signature: `checkpoint.trust_unsigned` waives the signature
  only.
- `verified_loading` routes both loaders of `Accelerator.load_state` through it: DeepSpeed's
  pluggable checkpoint engine (`VerifiedCheckpointEngine`, in place of its `TorchCheckpointEngine`,
  which loads with `weights_only=False`) and Accelerate's own `load` / `load_model`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from scalelora.errors import CheckpointError

HASH_BLOCK = 1 << 20


def deepspeed_allowlist() -> list[Any]:
    """The non-tensor types DeepSpeed 0.19's ZeRO-2, ZeRO-3 and ZeRO-3 + offload checkpoints hold, found
    by listing the globals of real ones (`tests/test_deepspeed.py` checks the list against fresh
    checkpoints), and fp16's dynamic loss scaler. Each is plain data once loaded: an enum, a dataclass
    of numbers and strings, a loss scaler's numbers."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def refused_type(err: BaseException) -> str | None:
    """The global a weights_only load refused (e.g. `posix.mkdir`), from torch's message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return found.group(1) if found else None


class ListedFiles:
    """The files a (verified) manifest lists, `name -> {"size", "sha256"}` relative to `folder`."""

    def __init__(self, folder: Path, files: dict[str, dict[str, Any]]) -> None:
        self.folder = Path(folder)
        self.files = files

    def name_of(self, path: str | os.PathLike[str]) -> str:
        """`path` as a manifest name; CheckpointError when it is not inside the folder."""
        given = Path(path)
        if not given.is_absolute():
            given = Path.cwd() / given
        try:
            relative = Path(os.path.normpath(given)).relative_to(os.path.normpath(self.folder.absolute()))
        except ValueError:
            raise CheckpointError(
                f"refused to load {path}: it is outside the checkpoint folder {self.folder}"
            ) from None
        return relative.as_posix()

    def open(self, path: str | os.PathLike[str]) -> BinaryIO:
        """Open `path` for reading once it is shown to be the file the manifest lists under its name.

        The returned file is positioned at its start; the caller closes it. Raises CheckpointError
        naming the file when it is unlisted, a symlink (or under one), not a regular file, or of
        another size or sha256 than listed.
        """
        name = self.name_of(path)
        shown = self.folder / name
        expected = self.files.get(name)
        if expected is None:
            raise CheckpointError(
                f"refused to load {shown}: the checkpoint's manifest does not list it (planted, or added after "
                "the checkpoint was written)"
            )
        handle = os.fdopen(open_under(self.folder, name), "rb")
        try:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise CheckpointError(f"refused to load {shown}: not a regular file")
            if info.st_size != expected["size"]:
                raise CheckpointError(
                    f"{shown} has {info.st_size} bytes, the manifest says {expected['size']} (truncated?)"
                )
            digest = hashlib.sha256()
            for block in iter(lambda: handle.read(HASH_BLOCK), b""):
                digest.update(block)
            if digest.hexdigest() != expected["sha256"]:
                raise CheckpointError(f"{shown} does not match its checksum (altered or corrupted on disk)")
            handle.seek(0)
        except BaseException:
            handle.close()
            raise
        return handle

    def read_bytes(self, name: str) -> bytes:
        with self.open(self.folder / name) as handle:
            return handle.read()


def open_under(folder: Path, name: str) -> int:
    """A read-only descriptor of `folder/name`, following no symlink in `name` (O_NOFOLLOW on each part)."""
    parts = name.split("/")
    flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
    nofollow = getattr(os, "O_NOFOLLOW", 0)
    directory = getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(folder, flags | directory)
    except OSError as err:
        raise CheckpointError(f"cannot open checkpoint folder {folder}: {err.strerror or err}") from None
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            # O_NONBLOCK: a FIFO put in a file's place opens at once (and is then refused), never hangs
            mode = getattr(os, "O_NONBLOCK", 0) if last else directory
            try:
                child = os.open(part, flags | nofollow | mode, dir_fd=fd)
            except OSError as err:
                where = folder / "/".join(parts[: i + 1])
                if os.path.islink(where):
                    raise CheckpointError(
                        f"refused to load {folder / name}: {where} is a symlink (a checkpoint holds plain files only)"
                    ) from None
                raise CheckpointError(f"cannot open {where}: {err.strerror or err}") from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def refusal(shown: str | os.PathLike[str], err: BaseException) -> CheckpointError:
    """The one-line error for a file a weights_only load refused (`err`: torch's UnpicklingError)."""
    what = refused_type(err)
    held = f"a {what} object" if what else "pickle code that is not plain tensors and numbers"
    return CheckpointError(
        f"refused to load {shown}: it holds {held}, which scalelora does not unpickle (it could run code); "
        "the checkpoint was not written by scalelora, or was altered"
    )


def torch_load(
    handle: BinaryIO, shown: str | os.PathLike[str], map_location: Any = None, allow: list[Any] | None = None
) -> Any:
    """`torch.load(handle, weights_only=True)` with the types in `allow` accepted for this load only.

    Raises CheckpointError naming the file and the type when the file holds anything else.
    """
    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(handle, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise refusal(shown, err) from None


def verified_engine(files: ListedFiles, original: Any) -> Any:
    """A DeepSpeed checkpoint engine that loads only listed, matching files with `weights_only=True`."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    allow = deepspeed_allowlist()

    class VerifiedCheckpointEngine(TorchCheckpointEngine):
        def __init__(self) -> None:
            # the base __init__ only logs and reads the serialization flag, taken from the engine replaced
            self.name = "VerifiedCheckpointEngine"
            self.zipfile_serialization = getattr(original, "zipfile_serialization", True)

        def load(self, path: str, map_location: Any = None) -> Any:
            with files.open(path) as handle:
                return torch_load(handle, path, map_location, allow)

    return VerifiedCheckpointEngine()


@dataclass
class ModelLoad:
    """What one of Accelerate's model-weight loads (`load_model`, safetensors) did: the names of `model`
    it left as they were (`missing`) and those in the file that matched nothing (`unexpected`)."""

    model: torch.nn.Module
    missing: set[str]
    unexpected: set[str]


@contextlib.contextmanager
def verified_loading(accelerator: Any, files: ListedFiles, deepspeed: bool) -> Iterator[list[ModelLoad]]:
    """Inside the block, `accelerator.load_state(files.folder)` reads every file through `files.open`
    and unpickles nothing but tensors, numbers and the allowlisted DeepSpeed types. The block gets the
    list of model-weight loads, filled as they happen (Accelerate loads with strict=False and keeps
    no result: checking it is the caller's).

    Accelerate's RNG load swallows every error ("Could not load random states"), so an error raised
    here is also re-raised when the block ends.
    """
    import accelerate.checkpointing as accelerate_checkpointing

    errors: list[CheckpointError] = []
    loads: list[ModelLoad] = []
    accelerate_load = accelerate_checkpointing.load
    accelerate_load_model = accelerate_checkpointing.load_model

    def load(f: Any, map_location: Any = None, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True  # its custom-state loader asks for False: never
        try:
            with files.open(f) as handle:
                try:
                    return accelerate_load(handle, map_location=map_location, **kwargs)
                except pickle.UnpicklingError as err:
                    raise refusal(f, err) from None
        except CheckpointError as err:
            errors.append(err)
            raise

    def load_model(model: torch.nn.Module, filename: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            with files.open(filename) as handle:
                # the descriptor's own path: safetensors maps the file already checked, not the name again
                result = accelerate_load_model(model, fd_path(handle.fileno()), *args, **kwargs)
                missing, unexpected = result
                loads.append(ModelLoad(model, set(missing), set(unexpected)))
                return result
        except CheckpointError as err:
            errors.append(err)
            raise

    engines = [model for model in getattr(accelerator, "_models", []) if hasattr(model, "checkpoint_engine")]
    if deepspeed and not engines:
        # fail closed: without its engine replaced, DeepSpeed would load with weights_only=False
        raise CheckpointError(f"cannot load {files.folder}: no prepared DeepSpeed engine to load it through")
    saved = [(engine, engine.checkpoint_engine) for engine in engines]
    accelerate_checkpointing.load = load
    accelerate_checkpointing.load_model = load_model
    try:
        for engine, original in saved:
            engine.checkpoint_engine = verified_engine(files, original)
        yield loads
    finally:
        accelerate_checkpointing.load = accelerate_load
        accelerate_checkpointing.load_model = accelerate_load_model
        for engine, original in saved:
            engine.checkpoint_engine = original
    if errors:
        raise errors[0]


def fd_path(fd: int) -> str:
    """A path that opens the file behind `fd` itself (Linux /proc, else /dev/fd), not whatever its name is now."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else f"/dev/fd/{fd}"
