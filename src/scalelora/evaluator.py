"""What a run does with its evaluations: evaluation.py computes the metrics of a split, the Evaluator
decides what they mean for the run.

During training (`validate`): the validation split with the decision rule tuned on it, its record in
metrics.jsonl, W&B and the log, the model saved when `eval.metric` improves, and early stopping. At the
end (`final`): the best weights (or the last), the temperature and decision rule fitted on validation and
saved with them, both splits reported with and without them. And the sample predictions shown before and
after training.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from scalelora import data as data_lib
from scalelora import longtext
from scalelora.calibration import CALIBRATION_FILE, MULTI_LABEL, Calibration, fit_calibration
from scalelora.checkpoint import Checkpointer
from scalelora.config import RunConfig
from scalelora.evaluation import SplitOutputs, evaluate_split, split_metrics, write_predictions
from scalelora.meters import PhaseTimer
from scalelora.models import is_peft
from scalelora.runtime import unwrap_model

DECISION_METRICS = ("accuracy", "macro_f1", "micro_f1")


def eval_record(step: int, split: str, metrics: dict[str, Any], extra: bool = True) -> dict[str, Any]:
    """An evaluation's line in metrics.jsonl: the decision metrics, those of the tuned decision rule
    (`tuned_<metric>`) when there is one, and with `extra` the eval.extra_metrics values (the final
    records, `final_<split>`, leave them to summary.json)."""
    tuned = metrics.get("tuned", {})
    return {
        "step": step,
        "split": split,
        **{key: metrics[key] for key in DECISION_METRICS},
        **{f"tuned_{key}": tuned[key] for key in DECISION_METRICS if key in tuned},
        **({key: metrics[key] for key in metrics.get("extra_metrics", [])} if extra else {}),
    }


def wandb_eval_values(record: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """A validation record under W&B's keys (eval/<metric>, eval/tuned/<metric>), with the calibration
    numbers that metrics.jsonl leaves out (eval/ece, eval/nll) taken from `metrics`."""
    renamed = {f"tuned_{key}": f"tuned/{key}" for key in DECISION_METRICS}
    values = {"eval/ece": metrics.get("ece"), "eval/nll": metrics.get("nll")}
    for key, value in record.items():
        if key not in ("step", "split"):
            values[f"eval/{renamed.get(key, key)}"] = value
    return values


class BestSoFar(Protocol):
    """The part of the trainer state (trainer.TrainState) that the evaluations keep: resumed with it."""

    global_step: int
    best_value: float | None
    best_step: int | None
    evals_without_improvement: int


class Evaluator:
    """Evaluates one run's prepared model on its prepared `eval` (and `test`) loaders, and saves the
    model when an evaluation says so, through the run's Checkpointer."""

    last: tuple[int, dict[str, Any], SplitOutputs] | None = None
    """(step, metrics, outputs) of the latest validation: the final evaluation reuses it at that step."""
    calibration: Calibration | None = None
    """Temperature and decision rule fitted after training (None before, and with neither asked for)."""

    def __init__(
        self,
        cfg: RunConfig,
        accelerator: Any,
        model: torch.nn.Module,
        loaders: dict[str, Any],
        tokenizer: Any,
        splits: data_lib.Splits,
        tune_metric: str | None,
        extra_metrics: dict[str, Any],
        checkpointer: Checkpointer,
        tracker: Any,
        phases: PhaseTimer,
        echo: Callable[[str], None],
    ) -> None:
        self.cfg, self.accelerator, self.model, self.loaders = cfg, accelerator, model, loaders
        self.tokenizer, self.splits, self.extra_metrics = tokenizer, splits, extra_metrics
        self.label_names, self.problem_type = splits.label_names, splits.problem_type
        self.tune_metric = tune_metric  # what a decision rule is tuned for at each evaluation (None: none)
        self.checkpointer, self.tracker, self.phases, self.echo = checkpointer, tracker, phases, echo

    def predictions_path(self, save_as: str | None) -> Path | None:
        """predictions/<save_as>.jsonl when eval.save_predictions asks for it (None otherwise)."""
        if save_as and self.cfg.eval.save_predictions:
            return self.cfg.run_dir / "predictions" / f"{save_as}.jsonl"
        return None

    def evaluate(
        self,
        split: str = "eval",
        calibration: Calibration | None = None,
        tune: str | None = None,
        save_as: str | None = None,
    ) -> tuple[dict[str, Any], SplitOutputs]:
        """Metrics and gathered outputs of a split: with `calibration` applied, or with a decision rule
        tuned for `tune` on the split itself; with `save_as` and eval.save_predictions, also
        predictions/<save_as>.jsonl."""
        return evaluate_split(
            self.accelerator,
            self.model,
            self.loaders[split],
            self.label_names,
            self.extra_metrics,
            self.predictions_path(save_as),
            self.problem_type,
            calibration,
            tune,
            self.cfg.data.chunk_pool,
        )

    # --- during training -----------------------------------------------------------------------

    def validate(self, state: BestSoFar) -> bool:
        """Evaluate, save the model when the metric improves; True when early stopping says stop.

        With a decision rule to tune, it is tuned on the validation split at every evaluation and
        `eval.metric` is read from the tuned metrics: the best checkpoint is the best under the rule the
        final model will use.
        """
        cfg = self.cfg
        metrics, outputs = self.evaluate("eval", tune=self.tune_metric)
        self.last = (state.global_step, metrics, outputs)
        self.log_validation(state.global_step, metrics)
        value = metrics.get("tuned", metrics)[cfg.eval.metric]
        if state.best_value is None or value > state.best_value:
            state.best_value, state.best_step = value, state.global_step
            state.evals_without_improvement = 0
            if cfg.eval.load_best_at_end:
                with self.phases("save"):
                    self.save_model(step=state.global_step)
            return False
        state.evals_without_improvement += 1
        patience = cfg.eval.early_stopping_patience
        if patience and state.evals_without_improvement >= patience:
            self.echo(
                f"scalelora: early stopping at step {state.global_step} ({patience} evaluations without improvement)"
            )
            return True
        return False

    def log_validation(self, step: int, metrics: dict[str, Any]) -> None:
        """One validation record (`eval_record`): metrics.jsonl, W&B (its eval/ keys derived from the
        record), and a log line."""
        record = eval_record(step, "validation", metrics)
        self.checkpointer.append_metrics(record)
        self.tracker.log_metrics(wandb_eval_values(record, metrics), step=record["step"])
        shown = f" (tuned macro_f1={record['tuned_macro_f1']:.4f})" if "tuned_macro_f1" in record else ""
        self.echo(
            f"scalelora: step {record['step']} validation accuracy={metrics['accuracy']:.4f} "
            f"macro_f1={metrics['macro_f1']:.4f} micro_f1={metrics['micro_f1']:.4f}{shown}"
        )

    # --- at the end ----------------------------------------------------------------------------

    def final(self, state: BestSoFar) -> dict[str, Any]:
        """The final metrics by split, of the best weights (or the last): calibration and decision rule
        fitted on validation and saved with the model, both splits reported with and without them."""
        restored = self.cfg.eval.load_best_at_end and state.best_step is not None
        with self.phases("eval"):
            if restored:
                self.checkpointer.restore_best(self.model)
            last = self.last
            reuse = (
                last is not None
                and last[0] == state.global_step
                and state.best_step in (None, state.global_step)
            )
            if reuse:
                # the weights are the ones just evaluated at this step: reuse, do not run validation twice
                outputs = last[2]
            else:
                _, outputs = self.evaluate("eval")
            self.calibration = self.fit_calibration(outputs)
            final_eval = {
                "validation": split_metrics(
                    outputs, self.label_names, self.problem_type, self.calibration, self.extra_metrics
                )
            }
            path = self.predictions_path("validation")
            if path is not None and self.accelerator.is_main_process:
                write_predictions(path, outputs, self.label_names, self.problem_type, self.calibration)
            if "test" in self.loaders:
                final_eval["test"] = self.evaluate("test", calibration=self.calibration, save_as="test")[0]
        if self.calibration is not None or not restored:
            with self.phases("save"):
                self.save_model(self.calibration, step=state.best_step if restored else state.global_step)
        return final_eval

    def fit_calibration(self, outputs: SplitOutputs) -> Calibration | None:
        """Temperature (eval.calibrate) and decision rule (eval.tune_thresholds) fitted on the validation
        outputs of the final weights; None when neither is asked for."""
        cfg = self.cfg
        if not cfg.eval.calibrate and not self.tune_metric:
            return None
        calibration = fit_calibration(
            self.problem_type,
            outputs.logits,
            outputs.labels,
            self.label_names,
            cfg.eval.calibrate,
            self.tune_metric,
        )
        parts = []
        if calibration.temperature is not None:
            parts.append(f"temperature {calibration.temperature:.3f}")
        if calibration.tuned:
            rule = "per-label thresholds" if self.problem_type == MULTI_LABEL else "per-class biases"
            parts.append(f"{rule} tuned for {calibration.tuned_for}")
        self.echo(f"scalelora: fitted on validation: {', '.join(parts)}")
        return calibration

    def log_final(self, step: int, final_eval: dict[str, Any]) -> None:
        """The final records in metrics.jsonl (`final_<split>`)."""
        for split, metrics in final_eval.items():
            self.checkpointer.append_metrics(eval_record(step, f"final_{split}", metrics, extra=False))

    def save_model(self, calibration: Calibration | None = None, *, step: int) -> None:
        """adapter/ (LoRA) or model/ (full, head_only), loadable with PEFT / transformers alone, with
        `calibration.json` beside the weights when a calibration is given; `step`: that of the weights."""
        cfg = self.cfg
        peft_model = is_peft(unwrap_model(self.model))
        meta: dict[str, Any] = {
            "scalelora.json": {
                "model_name": cfg.model.name,
                "mode": cfg.model.mode,
                "labels": self.label_names,
                "problem_type": self.problem_type,
                "max_length": cfg.data.max_length,
                "step": step,
                "text_pair": cfg.data.text_pair_column is not None,
                "calibration": CALIBRATION_FILE if calibration is not None else None,
                # long documents: what scalelora.predict applies (longtext.LongText.from_meta)
                **longtext.LongText.from_config(cfg.data).record(),
            },
            "labels.json": self.label_names,
        }
        if calibration is not None:
            meta[CALIBRATION_FILE] = calibration.to_json()
        self.checkpointer.save_model(self.model, self.tokenizer, meta, cfg.lora.r if peft_model else None)

    # --- sample predictions --------------------------------------------------------------------

    @torch.no_grad()  # not inference_mode: see evaluation.gather_logits (ZeRO-3)
    def sample_predictions(self) -> list[dict[str, Any]]:
        """Predictions for a fixed, seeded handful of validation texts (every rank runs the same forward),
        under the fitted calibration and decision rule once there is one, as `predict` makes them."""
        n = min(self.cfg.eval.sample_predictions, len(self.splits.eval))
        if n == 0:
            return []
        rows = self.splits.eval.shuffle(seed=self.cfg.seed).select(range(n))
        model = self.model
        model.eval()
        # as training saw them: cleaned, cut or in windows (data.long_text), one batch
        logits = longtext.document_logits(
            model,
            self.tokenizer,
            list(rows["text"]),
            longtext.LongText.from_config(self.cfg.data),
            batch_size=n,
            device=self.accelerator.device,
            pairs=list(rows["text_pair"]) if "text_pair" in rows.column_names else None,
        ).numpy()
        rule = self.calibration or Calibration(self.problem_type, self.label_names)
        probs, decided = rule.probabilities(logits), rule.decide(logits)
        names = self.label_names
        out = []
        for i in range(n):
            gold = rows[i]["label"]
            if self.problem_type == MULTI_LABEL:
                # most probable first, as predict lists them
                chosen = sorted((k for k in range(len(names)) if decided[i, k]), key=lambda k: -probs[i, k])
                row = {
                    "gold": [names[k] for k in range(len(names)) if gold[k]],
                    "predicted": [names[k] for k in chosen],
                    "confidence": [float(probs[i, k]) for k in chosen],
                }
            else:
                pred = int(decided[i])
                row = {"gold": names[gold], "predicted": names[pred], "confidence": float(probs[i, pred])}
            out.append({"text": rows[i]["text"], **row})
        return out
