"""Experiment tracking: W&B on the main process, a do-nothing tracker everywhere else.

The trainer calls `log`, `summary` and `finish` unconditionally; which ranks talk to W&B is
decided here, so no `if rank == 0` sits in the loop.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from scalelora.config import RunConfig
from scalelora.errors import ConfigError

RUN_ID_FILE = "wandb_run_id.txt"


class NullTracker:
    run_id: str | None = None

    def log(self, values: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        pass

    def finish(self) -> None:
        pass


def wandb_mode(configured: str | None) -> str:
    """Online only when a key is configured, so an unattended run never waits on a login prompt."""
    if configured:
        return configured
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").is_file()
    return "online" if has_key else "offline"


class WandbTracker:
    """One W&B run per output_dir; its id is kept in output_dir so a resumed run continues it."""

    def __init__(self, cfg: RunConfig, config_dict: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "tracking.report_to=wandb needs wandb: pip install 'scalelora[wandb]'"
            ) from None
        self._wandb = wandb
        run_dir = cfg.run_dir
        id_file = run_dir / RUN_ID_FILE
        self.run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        settings = cfg.tracking.wandb
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or run_dir.name,
            group=settings.group,
            tags=list(settings.tags) or None,
            mode=wandb_mode(settings.mode),
            id=self.run_id,
            resume="allow",
            dir=str(run_dir),
            config=config_dict,
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id + "\n")

    def log(self, values: dict[str, Any], step: int) -> None:
        self.run.log(values, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        self.run.log({key: self._wandb.Table(columns=columns, data=rows)})

    def finish(self) -> None:
        self.run.finish()


def build_tracker(
    cfg: RunConfig, is_main_process: bool, config_dict: dict[str, Any]
) -> NullTracker | WandbTracker:
    if cfg.tracking.report_to == "none" or not is_main_process:
        return NullTracker()
    return WandbTracker(cfg, config_dict)
