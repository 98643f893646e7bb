"""User-facing errors and the one place that turns them into `scalelora: error: ...` and exit code 2."""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable

USAGE_EXIT_CODE = 2


class UserError(Exception):
    """A mistake the user can fix (config, data, paths). Printed as one line, exit code 2."""

    exit_code = USAGE_EXIT_CODE


class ConfigError(UserError):
    """A config key, value or combination of values that cannot work."""


class DataError(UserError):
    """A dataset that cannot be loaded or does not match the config."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete, corrupt or from another run."""


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint whose manifest is not signed with this user's key, or whose folder holds what the manifest
    does not list (a planted file, a symlink): refused, never skipped as damaged."""


class UnsafeWeightsError(UserError):
    """Weights that exist only as pickle (which can run code when loaded), refused without the user's opt-in."""


class CalibrationError(UserError):
    """A calibration.json (temperature, thresholds, biases) that does not fit the model beside it."""


class TrainingHalted(UserError):
    """Training stopped on purpose (e.g. non-finite loss with train.on_nonfinite=stop) after saving state."""

    exit_code = 3


def error_class(name: str) -> type[UserError]:
    """The UserError subclass named `name`, or UserError itself for a name it does not know.

    Errors cross process boundaries by class name (the exception objects stay on the rank that raised
    them), so every rank raises the same class: the same exit code, the same `except` clauses.
    """
    todo, known = [UserError], {}
    while todo:
        cls = todo.pop()
        known[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return known.get(name, UserError)


def one_line(message: object, limit: int | None = None) -> str:
    """`message` (an error or text) on one line, cut to `limit` characters when given."""
    text = " ".join(str(message).split())
    return text if limit is None else text[:limit]


def error_line(message: str) -> None:
    """Write `scalelora: error: message` to stderr in one write: `print` writes the text and its newline
    separately (stderr is write-through), so the lines of two ranks sharing a terminal or pipe could
    interleave into one."""
    sys.stderr.write(f"scalelora: error: {message}\n")
    sys.stderr.flush()


def exit_on_user_error(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a CLI `main(argv)`: a `UserError` becomes one stderr line and exit code 2.

    `--debug` on the command line (or SCALELORA_DEBUG=1) re-raises so the traceback is shown.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        args = sys.argv[1:] if argv is None else argv
        debug = "--debug" in args or os.environ.get("SCALELORA_DEBUG") == "1"
        try:
            return main(argv) or 0
        except UserError as err:
            if debug:
                raise
            error_line(one_line(err))
            return err.exit_code
        except OSError as err:
            # a full disk can strike any write (metrics, logs, a tracker), not only the guarded ones
            if debug or err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            where = f" while writing {err.filename}" if err.filename else ""
            error_line(f"no space left on the device{where}; free space there and resume with resume=auto")
            return USAGE_EXIT_CODE
        except KeyboardInterrupt:
            print("scalelora: interrupted", file=sys.stderr, flush=True)
            return 130

    return wrapper
