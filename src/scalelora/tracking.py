"""Experiment tracking: W&B on the main process, a do-nothing tracker everywhere else.

The trainer calls `log_metrics`, `set_summary`, `log_final` and `close` unconditionally; which ranks talk to
W&B is decided here, so no `if rank == 0` sits in the loop.

A run's W&B id is kept in `output_dir/wandb_run_id.txt` and the last step sent to W&B in
`output_dir/wandb_last_step.txt`: a resumed or requeued run continues the same W&B run
(`resume="allow"`) and drops the steps the killed process had already sent after its last
checkpoint, so W&B never sees a duplicate or backwards step. The API key is read by wandb
itself from the environment or ~/.netrc; scalelora never reads, prints or writes it.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from scalelora.config import RunConfig
from scalelora.errors import ConfigError

RUN_ID_FILE = "wandb_run_id.txt"
LAST_STEP_FILE = "wandb_last_step.txt"
WANDB_MODES = ("online", "offline", "disabled")


class NullTracker:
    """What non-main ranks and `report_to=none` get: every call does nothing."""

    run_id: str | None = None

    def log_metrics(self, values: dict[str, Any], step: int) -> None:
        pass

    def set_summary(self, values: dict[str, Any]) -> None:
        pass

    def log_final(self, summary: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def has_api_key() -> bool:
    """True when wandb would find a key (WANDB_API_KEY or a ~/.netrc entry); the key itself is never read here."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    try:
        return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    except OSError:
        return False


def wandb_mode(configured: str | None) -> str:
    """The configured mode, else $WANDB_MODE, else online only when a key is configured, so an
    unattended run never waits on a login prompt."""
    if configured:
        return configured
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in WANDB_MODES:
        return env
    if env == "dryrun":
        return "offline"
    return "online" if has_api_key() else "offline"


def param_counts(trainable: int, total: int) -> dict[str, Any]:
    return {
        "params/trainable": trainable,
        "params/total": total,
        "params/trainable_pct": 100.0 * trainable / max(total, 1),
    }


class WandbTracker:
    """One W&B run per output_dir; its id is kept in output_dir so a resumed run continues it."""

    def __init__(self, cfg: RunConfig, config_dict: dict[str, Any], mode: str) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError(
                "tracking.report_to=wandb needs wandb: pip install 'scalelora[wandb]'"
            ) from None
        self._wandb = wandb
        self.run_dir = cfg.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.run_dir / RUN_ID_FILE
        step_file = self.run_dir / LAST_STEP_FILE
        resumed = id_file.is_file()
        self.run_id = id_file.read_text().strip() if resumed else uuid.uuid4().hex[:8]
        # steps up to here are already in W&B (sent before a crash or preemption): never send them twice
        self.floor = int(step_file.read_text()) if resumed and step_file.is_file() else -1
        self.step: int | None = None
        """The last step this process sent."""
        settings = cfg.tracking.wandb
        self.run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or self.run_dir.name,
            group=settings.group,
            tags=list(settings.tags) or None,
            mode=mode,
            id=self.run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=config_dict,
        )
        id_file.write_text(self.run_id + "\n")

    def _claim(self, step: int) -> bool:
        """True when `step` may be sent: past every step of earlier processes, not before this one's last."""
        if step <= self.floor or (self.step is not None and step < self.step):
            return False
        if step != self.step:
            self.step = step
            (self.run_dir / LAST_STEP_FILE).write_text(f"{step}\n")
        return True

    def _current_step(self) -> int:
        """Where tables and plots go: this process's last step, else just past the earlier ones."""
        if self.step is None:
            self._claim(max(self.floor + 1, 0))
        return self.step

    def log_metrics(self, values: dict[str, Any], step: int) -> None:
        if self._claim(step):
            self.run.log(values, step=step)

    def set_summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def log_final(self, summary: dict[str, Any]) -> None:
        """The end of a run: best metric and step, final metrics per split (with the tuned decision rule
        and after calibration when fitted), parameter counts, a confusion matrix per split (a per-label
        confusion table for multi-label), and the before/after sample predictions."""
        wandb = self._wandb
        values: dict[str, Any] = {
            "best/metric": summary["best"]["metric"],
            "best/value": summary["best"]["value"],
            "best/step": summary["best"]["step"],
            "samples_per_second": summary.get("samples_per_second"),
            "tokens_per_second": summary.get("tokens_per_second"),
            "train_seconds": summary.get("train_seconds"),
            **param_counts(summary["trainable_params"], summary["total_params"]),
        }
        for split, metrics in summary["eval"].items():
            for key in ("accuracy", "macro_f1", "micro_f1", "ece", "nll", *metrics.get("extra_metrics", [])):
                if key in metrics:
                    values[f"final/{split}/{key}"] = metrics[key]
            for key in ("accuracy", "macro_f1", "micro_f1"):
                if key in metrics.get("tuned", {}):
                    values[f"final/{split}/tuned/{key}"] = metrics["tuned"][key]
            for key in ("temperature", "ece", "nll"):
                if key in metrics.get("calibrated", {}):
                    values[f"final/{split}/calibrated/{key}"] = metrics["calibrated"][key]
        self.set_summary(values)
        labels = summary["labels"]
        payload: dict[str, Any] = {}
        for split, metrics in summary["eval"].items():
            per_label = metrics.get("confusion_per_label")
            if per_label:
                payload[f"confusion_per_label/{split}"] = wandb.Table(
                    columns=["label", "tp", "fp", "fn", "tn"],
                    data=[[name, c["tp"], c["fp"], c["fn"], c["tn"]] for name, c in per_label.items()],
                )
            matrix = metrics.get("confusion_matrix")
            if not matrix:
                continue
            table = wandb.Table(
                columns=["Actual", "Predicted", "nPredictions"],
                data=[
                    [labels[i], labels[j], int(matrix[i][j])]
                    for i in range(len(labels))
                    for j in range(len(labels))
                ],
            )
            payload[f"confusion_matrix/{split}"] = wandb.plot_table(
                "wandb/confusion_matrix/v1",
                table,
                {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                {"title": f"confusion matrix ({split})"},
            )

        def cell(value: Any) -> Any:  # a multi-label set becomes one text cell
            if isinstance(value, list):
                return ", ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in value)
            return value

        rows = [
            [
                row["text"],
                cell(row["gold"]),
                cell(row["before"]),
                cell(row["before_confidence"]),
                cell(row["after"]),
                cell(row["after_confidence"]),
            ]
            for row in summary.get("sample_predictions", [])
        ]
        if rows:
            payload["sample_predictions"] = wandb.Table(
                columns=["text", "gold", "before", "before_confidence", "after", "after_confidence"],
                data=rows,
            )
        if payload:
            self.run.log(payload, step=self._current_step())

    def close(self) -> None:
        self.run.finish()


def build_tracker(
    cfg: RunConfig, is_main_process: bool, config_dict: dict[str, Any]
) -> NullTracker | WandbTracker:
    """W&B on the main process when `tracking.report_to=wandb` and the mode is not `disabled`
    (which writes nothing at all); a NullTracker otherwise. Raises ConfigError without wandb installed."""
    if cfg.tracking.report_to == "none" or not is_main_process:
        return NullTracker()
    mode = wandb_mode(cfg.tracking.wandb.mode)
    if mode == "disabled":
        return NullTracker()
    return WandbTracker(cfg, config_dict, mode)
