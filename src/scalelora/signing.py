"""The key that signs checkpoint manifests, kept outside every output_dir.

A manifest (size and sha256 of every file) proves a checkpoint is complete and unaltered, but it
sits in the checkpoint's folder: whoever can write there can rewrite it too. Each manifest
therefore carries an HMAC-SHA256 made with a key that only this user can read; a checkpoint whose
manifest does not carry it was not written by this user with this key, and is refused unless
`checkpoint.trust_unsigned=true`. The signature vouches for the training state (weights, optimizer,
schedule); it is not what keeps code from running: no checkpoint file is unpickled beyond plain
data, signed or not (`safe_load.py`, which states the threat model), and `trust_unsigned` waives
the signature only.

The key file is `$SCALELORA_KEY_FILE`, else `$XDG_CONFIG_HOME/scalelora/checkpoint.key`, else
`~/.config/scalelora/checkpoint.key`; it is created (mode 0600, 32 random bytes as hex) the first
time a run starts (`check_key`, at setup: a key problem then stops the run before its first step,
not at its first checkpoint). Every node that resumes a run needs the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path

from scalelora.errors import CheckpointError

KEY_ENV = "SCALELORA_KEY_FILE"
KEY_BYTES = 32


def key_path() -> Path:
    """Where this user's checkpoint key lives (see the module docstring)."""
    configured = os.environ.get(KEY_ENV)
    if configured:
        return Path(configured).expanduser()
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "scalelora" / "checkpoint.key"


def create_key(path: Path) -> None:
    """Write a new random key to `path` (mode 0600) unless one is there; never replace an existing one.

    The key is written to a private temporary file and hard-linked into place, so a process that
    reads `path` sees a whole key or none, and of two processes creating it at once one key wins.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(KEY_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_key(create: bool) -> bytes:
    """This user's checkpoint key; created first when `create` (writing a checkpoint) and missing.

    Raises CheckpointError when the key is missing (and not to be created), readable or writable by
    other users, or not a key.
    """
    path = key_path()
    if not path.is_file():
        if not create:
            raise CheckpointError(
                f"no checkpoint key at {path} to verify the checkpoint with; if the run was written on another "
                f"node or account, set {KEY_ENV} on every node to the same key file (on a shared filesystem, "
                "readable by you only)"
            )
        try:
            create_key(path)
        except OSError as err:
            raise CheckpointError(
                f"cannot create the checkpoint key at {path} ({err.strerror or err}); set {KEY_ENV} to a file "
                "in a folder you can write (on a shared filesystem when the run spans nodes)"
            ) from None
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise CheckpointError(
            f"the checkpoint key {path} can be read or written by other users, who could then sign checkpoints "
            f"as you: chmod 600 {path}"
        )
    try:
        key = bytes.fromhex(path.read_text().strip())
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise CheckpointError(
            f"{path} is not a scalelora checkpoint key ({2 * KEY_BYTES} hex digits); move it away and a new "
            "one is made at the next checkpoint (checkpoints signed with the old one are then refused)"
        )
    return key


def check_key() -> None:
    """Make sure this user's key is usable for signing now (created when missing), so a key problem
    stops a run at setup rather than at its first checkpoint, which by default is its end.

    Raises CheckpointError as `load_key` does, and when the key cannot be created.
    """
    load_key(create=True)


def key_id(key: bytes) -> str:
    """A short public name of a key (a hash of it), to tell keys apart in messages."""
    return hashlib.sha256(b"scalelora-key-id" + key).hexdigest()[:16]


def sign(payload: bytes, key: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def signature_matches(payload: bytes, signature: str, key: bytes) -> bool:
    # as bytes: compare_digest raises TypeError on a str with non-ASCII characters
    return hmac.compare_digest(sign(payload, key).encode(), signature.encode("utf-8", "surrogatepass"))
