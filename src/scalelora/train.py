"""`python -m scalelora.train --config RECIPE [key=value ...]` (also under `accelerate launch -m`):
parse, `run_training(cfg)`, exit codes (0 done, 2 a user error, 3 halted, 75 preempted)."""

from __future__ import annotations

import argparse
import sys

from scalelora.config import AUTO_RECIPE, dump_yaml, load_config, recipe_descriptions
from scalelora.errors import UserError, exit_on_user_error


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scalelora.train",
        description="Fine-tune a sequence classifier with LoRA (or fully) in a custom Accelerate loop.",
        epilog="Overrides are dotted config keys, e.g. lora.r=16 train.lr=3e-4 data.keep_labels=[Positive,Negative].",
    )
    parser.add_argument(
        "--config",
        help="a shipped recipe name (see --list) or a YAML file; without it, data.path=FOLDER uses the "
        "recipe `auto`, which chooses its settings from the data",
    )
    parser.add_argument("--list", action="store_true", help="list the shipped recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, description in recipe_descriptions().items():
            print(f"{name:28s} {description}")
        return 0
    if not args.config:
        if not any(item.split("=", 1)[0].strip() == "data.path" for item in args.overrides):
            raise UserError(
                "--config RECIPE_OR_YAML is required (see --list), or data.path=FOLDER "
                "for the default that chooses its settings from your data"
            )
        args.config = AUTO_RECIPE
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from scalelora.trainer import Preempted, run_training  # heavy imports only when training

    try:
        run_training(cfg)
    except Preempted as stop:
        print(f"scalelora: {stop}; resume with resume=auto", file=sys.stderr, flush=True)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
