"""`python -m scalelora.pipeline` (code: `scalelora.study.pipeline`) `--config RECIPE [--out DIR] [--runs a,b]
[key=value | RUN:key=value ...]`.

For one dataset, runs the teacher -> student study and its baselines, then writes `results.json`
and `results.md` in `--out` (one row per run):

1. `teacher_full`        full fine-tune of the recipe's model (the teacher, saved to teacher_full/model)
2. `lora_on_teacher`     LoRA on the frozen teacher, no distillation
3. `lora_on_teacher_kd`  the same with KD from the teacher (cached logits)
4. `head_only`           frozen pretrained encoder, trainable classification head
5. `linear_probe`        logistic regression on frozen mean-pooled pretrained features
6. `lora_base_kd`        LoRA on the pretrained (not teacher) base with KD from the teacher
7. `auto_default`        the default for unseen data (recipe `auto`) given only the recipe's data.path
                         and data.keep_labels: no per-dataset setting at all
8. `tfidf_lr`            word + char TF-IDF and logistic regression on the whole training split
   (`tfidf_lr_subset`: the same on the transformers' `data.max_train_samples` subset, when set)
On request (`--runs recipe,...`): `recipe`, the recipe trained exactly as it is.

Per-run settings, later ones winning: STAGE_DEFAULTS below, the recipe's `pipeline: {RUN: [key=value,
...]}` section, `key=value` on the command line (every trained run), `RUN:key=value` (one run). Teacher
logits for runs 3 and 6 are computed once into `teacher_logits/` (a cache as `python -m
scalelora.teacher_logits` builds it). A finished run whose settings are unchanged is reused (`--fresh`
recomputes everything). Every row records the date, the machine, the exact command that reproduces it,
the resolved config, and the test predictions (for paired comparisons).

On multi-label data (e.g. the `goemotions` recipe) the students train with BCE and tuned thresholds,
and rows 5 and 8 are one-vs-rest logistic regressions with per-label thresholds tuned on validation;
every row then also reports micro-F1 and the tuned numbers (`tuned`), and its test predictions are
label sets under the tuned thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from scalelora.config import (
    AUTO_RECIPE,
    config_differences,
    config_keys,
    load_config,
    parse_overrides,
    to_dict,
)
from scalelora.errors import ConfigError, DataError, UserError, exit_on_user_error
from scalelora.files import atomic_write_json
from scalelora.report import RUN_COLUMNS, fmt, machine_line, source_commit, table

TRAINED_RUNS = (
    "teacher_full",
    "lora_on_teacher",
    "lora_on_teacher_kd",
    "head_only",
    "lora_base_kd",
    "auto_default",
    "recipe",
)
# The rows of a study by default; `recipe` (the recipe trained as it is) is there on request (--runs).
RUNS = (
    "teacher_full",
    "lora_on_teacher",
    "lora_on_teacher_kd",
    "head_only",
    "linear_probe",
    "lora_base_kd",
    "auto_default",
    "tfidf_lr",
)
DESCRIPTIONS = {
    "teacher_full": "(1) teacher: full fine-tune",
    "lora_on_teacher": "(2) LoRA on frozen teacher",
    "lora_on_teacher_kd": "(3) LoRA on frozen teacher + KD",
    "head_only": "(4) head only, pretrained encoder",
    "linear_probe": "(5) linear probe (LR on mean-pooled features)",
    "lora_base_kd": "(6) LoRA on pretrained base + KD from teacher",
    "auto_default": "default, no tuning (`data.path=...` only)",
    "recipe": "the recipe as shipped (`--config RECIPE`)",
    "tfidf_lr": "TF-IDF word+char + LR (whole train split)",
    "tfidf_lr_subset": "TF-IDF word+char + LR (same train subset)",
}
# Per-run settings on top of the recipe; the recipe's `pipeline:` section and the command line win.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "teacher_full": {"model.mode": "full", "train.lr": 1e-4, "train.epochs": 2},
    "lora_on_teacher": {"model.mode": "lora", "train.lr": 5e-4, "train.epochs": 1},
    "lora_on_teacher_kd": {
        "model.mode": "lora",
        "train.lr": 5e-4,
        "train.epochs": 1,
        "distill.enabled": True,
    },
    "head_only": {"model.mode": "head_only", "train.lr": 5e-3, "train.epochs": 2},
    "lora_base_kd": {"model.mode": "lora", "train.lr": 1e-3, "train.epochs": 2, "distill.enabled": True},
    "auto_default": {},
    "recipe": {},
}
# `distill.teacher=run:NAME` in a run's line: distil from run NAME of the same study (its cached logits).
SOURCE_PREFIX = "run:"
# The runs that fit a model of their own rather than train one through scalelora.train.
BASELINE_RUNS = ("linear_probe", "tfidf_lr", "tfidf_lr_subset")
KD_RUNS = ("lora_on_teacher_kd", "lora_base_kd")
ON_TEACHER = ("lora_on_teacher", "lora_on_teacher_kd")
# What the default run takes from the recipe: where the data is and which labels to keep, nothing else.
AUTO_DATA_KEYS = ("data.path", "data.root", "data.keep_labels")


# The version of the baselines' own code (TF-IDF features, the probe's pooling): part of their settings.
BASELINE_VERSION = 2


def baseline_settings(cfg: Any) -> dict[str, Any]:
    """What a baseline row depends on: the recipe's data settings, the encoder (the linear probe's) and
    BASELINE_VERSION; its rows record them as `settings`."""
    return to_dict(cfg)["data"] | {"model": cfg.model.name, "baseline_version": BASELINE_VERSION}


def last_of_each_key(overrides: list[str]) -> list[str]:
    """`key=value` overrides with only the last one of each key kept, where it stands: the same config
    (the last one wins anyway), and a recorded command that reads as it runs."""
    last = {item.split("=", 1)[0]: index for index, item in enumerate(overrides)}
    return [item for index, item in enumerate(overrides) if last[item.split("=", 1)[0]] == index]


def split_overrides(items: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Separate `key=value` (every run) from `RUN:key=value` (one run). Raises ConfigError on an unknown RUN."""
    common: list[str] = []
    per_run: dict[str, list[str]] = {}
    for item in items:
        key = item.split("=", 1)[0]
        if ":" in key:
            run, rest = item.split(":", 1)
            per_run.setdefault(run, []).append(rest)  # the Pipeline checks the name against the recipe
        else:
            common.append(item)
    parse_overrides(common)  # syntax errors now, not after an hour of training
    for values in per_run.values():
        parse_overrides(values)
    return common, per_run


def _value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    return "true" if v is True else "false" if v is False else str(v)


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _same_settings(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether a finished run's saved stamp still describes `now`: the same recipe and extras (teacher,
    cache), and the same settings key by key, where a key missing from the saved settings (added to
    scalelora after that run) counts as its declared `before` value (config.config_differences)."""
    extras = {k for k in (*saved, *now) if k != "settings"}
    if any(saved.get(k) != now.get(k) for k in extras):
        return False
    settings_then, settings_now = saved.get("settings"), now.get("settings")
    if not (isinstance(settings_then, dict) and isinstance(settings_now, dict)):
        return settings_then == settings_now
    if isinstance(settings_now.get("model"), str):  # a baseline's: the data section, its encoder, its version
        own = ("model", "baseline_version")
        if any(settings_then.get(k) != settings_now.get(k) for k in own):
            return False
        data_keys = [k for k in config_keys() if k.startswith("data.")]
        return not config_differences({"data": settings_then}, {"data": settings_now}, keys=data_keys)
    return not config_differences(settings_then, settings_now)


class Pipeline:
    """Runs the study for one recipe into `out`; see the module docstring."""

    def __init__(
        self, recipe: str, out: Path, overrides: list[str], runs: tuple[str, ...] = RUNS, fresh: bool = False
    ) -> None:
        self.recipe = recipe
        self.out = out
        self.common, self.per_run = split_overrides(overrides)
        self.fresh = fresh
        self.base_cfg = load_config(recipe, self.common)
        # a recipe's `pipeline:` section may name runs of its own besides the standard ones: variants,
        # each the recipe as shipped with its line of overrides on top (e.g. results_imdb's long-text modes)
        self.variants = tuple(run for run in self.base_cfg.pipeline if run not in TRAINED_RUNS)
        bad = [run for run in self.variants if not run.isidentifier() or run in BASELINE_RUNS]
        if bad:
            raise ConfigError(
                f"--config {recipe}: its pipeline section names {bad}: a run of its own needs a name of letters, "
                f"digits and _ that is not a baseline ({', '.join(BASELINE_RUNS)})"
            )
        known = (*RUNS, "recipe", *self.variants)
        unknown = [r for r in runs if r not in known]
        if unknown:
            raise ConfigError(f"--runs names {unknown}; choose from {', '.join(known)}")
        trained = (*TRAINED_RUNS, *self.variants)
        for run in self.per_run:
            if run not in trained:
                raise ConfigError(
                    f"override '{run}:...' names run '{run}'; trained runs are {', '.join(trained)}"
                )
        self.runs = runs
        self.teacher_dir = out / "teacher_full" / "model"
        self.cache_dir = out / "teacher_logits"
        self.rows: list[dict[str, Any]] = []

    def log(self, message: str) -> None:
        print(f"scalelora.pipeline: {message}", file=sys.stderr, flush=True)

    # --- overrides per run ----------------------------------------------------------------------

    def run_config(self, run: str) -> tuple[str, list[str]]:
        """(recipe, overrides) that reproduce `run` with `python -m scalelora.train --config ...`."""
        fixed: dict[str, Any] = {
            "output_dir": self.out / run,
            "overwrite": True,
            "eval.save_predictions": True,
        }
        if run == "auto_default":
            cfg = to_dict(self.base_cfg)
            data = [
                f"{k}={_value(cfg['data'][k.split('.')[1]])}"
                for k in AUTO_DATA_KEYS
                if cfg["data"][k.split(".")[1]] is not None
            ]
            # a precision the recipe pins (the results_* recipes: their committed rows were trained in
            # fp32) holds for this row too; otherwise the row gets `auto`, what a user gets
            pinned = cfg["train"]["precision"]
            precision = [f"train.precision={_value(pinned)}"] if pinned != "auto" else []
            return AUTO_RECIPE, last_of_each_key(
                data
                + precision
                + self.common
                + self.per_run.get(run, [])
                + [f"{k}={_value(v)}" for k, v in fixed.items()]
            )
        if run in ON_TEACHER:
            fixed["model.name"] = (
                self.teacher_dir
            )  # after the common overrides: a model.name there names the base
        if run in KD_RUNS:
            fixed["distill.teacher"] = "cache"
            fixed["distill.cache_dir"] = self.cache_dir
        source = self.source_run(run)
        if source is not None:  # distil from another run of this study: its cached logits
            fixed["distill.teacher"] = "cache"
            fixed["distill.cache_dir"] = self.out / source / "teacher_logits"
        return self.recipe, last_of_each_key(
            [f"{k}={_value(v)}" for k, v in STAGE_DEFAULTS.get(run, {}).items()]
            + list(self.base_cfg.pipeline.get(run, []))
            + self.common
            + self.per_run.get(run, [])
            + [f"{k}={_value(v)}" for k, v in fixed.items()]
        )

    def source_run(self, run: str) -> str | None:
        """The run of this study whose model `run` distils from: `distill.teacher=run:NAME` in its line
        (e.g. a MiniLM student of a decoder row), or None."""
        lines = list(self.base_cfg.pipeline.get(run, [])) + self.per_run.get(run, [])
        named = [item.split("=", 1)[1] for item in lines if item.startswith("distill.teacher=")]
        if not named or not named[-1].startswith(SOURCE_PREFIX):
            return None
        source = named[-1][len(SOURCE_PREFIX) :]
        if source == run or source in BASELINE_RUNS or source not in (*TRAINED_RUNS, *self.variants):
            raise ConfigError(
                f"run {run}: distill.teacher={named[-1]} must name another trained run of this study"
            )
        return source

    def logits_from_run(self, source: str, cfg: Any) -> Path:
        """Cache the logits of run `source`'s saved model on `cfg`'s data (a LoRA adapter is exported merged
        first, its fitted temperature folded into the head, as `python -m scalelora.export` does); return
        the cache folder."""
        from scalelora.export import merge_adapter
        from scalelora.teacher_logits import build_cache

        folder = self.out / source
        model = folder / "model"
        if (folder / "adapter" / "adapter_config.json").is_file():
            model = folder / "merged"
            adapter_time = (folder / "adapter" / "adapter_model.safetensors").stat().st_mtime
            if (
                not (model / "config.json").is_file()
                or (model / "config.json").stat().st_mtime < adapter_time
            ):
                self.log(f"{source}: exporting the adapter merged -> {model}")
                merge_adapter(folder / "adapter", model, overwrite=True)
        if not (model / "config.json").is_file():
            raise UserError(f"distilling from run {source} needs its model in {folder}; train {source} first")
        cache = folder / "teacher_logits"
        self.log(f"teacher logits of {source} -> {cache}")
        try:
            build_cache(cfg, str(model), cache)
        except DataError as err:
            self.log(f"rebuilding the teacher logits ({err})")
            build_cache(cfg, str(model), cache, overwrite=True)
        return cache

    # --- reuse of finished runs -----------------------------------------------------------------

    @staticmethod
    def _comparable(stamp: dict[str, Any]) -> dict[str, Any]:
        """The stamp without the recipe's `pipeline:` section: a run's own line is already applied to its
        resolved settings, so editing another run's line must not make this one retrain."""
        settings = stamp.get("settings")
        if isinstance(settings, dict) and "pipeline" in settings:
            stamp = {**stamp, "settings": {k: v for k, v in settings.items() if k != "pipeline"}}
        return stamp

    def _stamp(self, settings: Any) -> dict[str, Any]:
        return self._comparable({"recipe": self.recipe, "settings": settings})

    def _reusable(self, run: str, stamp: dict[str, Any]) -> dict[str, Any] | None:
        path = self.out / run / "pipeline_row.json"
        if self.fresh or not path.is_file():
            return None
        saved = json.loads(path.read_text())
        # rows saved before the pipeline section left the stamp compare the same way
        old = self._comparable(saved.get("stamp") or {})
        return saved["row"] if _same_settings(old, stamp) else None

    def _save_row(self, run: str, stamp: dict[str, Any], row: dict[str, Any]) -> None:
        atomic_write_json(self.out / run / "pipeline_row.json", {"stamp": stamp, "row": row})

    # --- the runs -------------------------------------------------------------------------------

    def train(self, run: str) -> dict[str, Any]:
        from scalelora.trainer import run_training

        recipe, overrides = self.run_config(run)
        cfg = load_config(recipe, overrides)
        stamp = self._stamp(to_dict(cfg))
        if (run in ON_TEACHER or run in KD_RUNS) and (self.teacher_dir / "model.safetensors").is_file():
            stamp["teacher_mtime"] = (self.teacher_dir / "model.safetensors").stat().st_mtime
        if run in KD_RUNS:
            stamp["cache"] = json.loads((self.cache_dir / "manifest.json").read_text())["teacher"]
        source = self.source_run(run)
        if source is not None:
            cache = self.logits_from_run(source, cfg)
            stamp["cache"] = json.loads((cache / "manifest.json").read_text())["teacher"]
        # the teacher is reused only with its weights: the runs after it train on them
        has_weights = run != "teacher_full" or (self.teacher_dir / "model.safetensors").is_file()
        reused = self._reusable(run, stamp) if has_weights else None
        if reused is not None:
            self.log(f"{run}: reusing the finished run in {self.out / run}")
            return reused
        command = shlex.join(["python", "-m", "scalelora.train", "--config", recipe, *overrides])
        self.log(f"{run}: training ({command})")
        # the run folder is overwritten: a retraining that is interrupted must not leave the old row reusable
        (self.out / run / "pipeline_row.json").unlink(missing_ok=True)
        started, load_before = time.time(), load_average()
        summary = run_training(cfg)  # resets Accelerate's process-wide state: stages may differ in precision
        # the config as the run used it (the auto recipe fills in values chosen from the data)
        used = yaml.safe_load((cfg.run_dir / "config.yaml").read_text())
        from scalelora.study.baselines import short_metrics

        row = {
            "trainable_params": summary["trainable_params"],
            "total_params": summary["total_params"],
            "eval": {split: short_metrics(m) for split, m in summary["eval"].items()},
            "train_seconds": summary["train_seconds"],
            "wall_seconds": time.time() - started,  # this invocation's: a resumed run's last one alone
            "resumed_at_steps": summary.get("resumed_at_steps", []),
            "num_train_examples": summary["num_train_examples"],
            "max_length": used["data"]["max_length"],
            "command": command,
            "config": used,
            "commit": summary.get("commit"),
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine_line(),
            "peak_memory_gb": summary.get("peak_memory_gb"),
            "peak_memory_scope": summary.get("peak_memory_scope"),
            "train_tokens": summary.get("train_tokens"),
            "autoconfig_rules": summary.get("autoconfig_rules"),
            "load_average": [load_before, load_average()],
            "predictions": read_predictions(cfg.run_dir / "predictions" / "test.jsonl"),
            "details": {
                "model": cfg.model.name,
                "mode": cfg.model.mode,
                "epochs": used["train"]["epochs"],
                "lr": used["train"]["lr"],
                "steps": summary["global_step"],
                "best_step": summary["best"]["step"],
                "distill": summary.get("distill"),
                "class_weights": summary.get("class_weights"),
            },
        }
        self._save_row(run, stamp, row)
        return row

    def teacher_logits(self) -> None:
        from scalelora.teacher_logits import build_cache

        cfg = load_config(self.recipe, self.common)
        self.log(f"teacher logits -> {self.cache_dir}")
        try:  # a complete cache of this very teacher for this data is kept as it is
            build_cache(cfg, str(self.teacher_dir), self.cache_dir)
        except DataError as err:
            self.log(f"rebuilding the teacher logits ({err})")
            build_cache(cfg, str(self.teacher_dir), self.cache_dir, overwrite=True)

    def baseline(self, run: str) -> dict[str, Any]:
        from scalelora import data as data_lib
        from scalelora.study import baselines

        cfg = self.base_cfg
        stamp = self._stamp(baseline_settings(cfg))
        reused = self._reusable(run, stamp)
        if reused is not None:
            self.log(f"{run}: reusing the finished run in {self.out / run}")
            return reused
        self.log(f"{run}: fitting")
        started, load_before = time.time(), load_average()
        splits = data_lib.load_splits(cfg.data, cfg.seed)
        if run == "linear_probe":
            row = baselines.linear_probe(
                splits, cfg.model.name, cfg.data.max_length, cfg.model.allow_pickle, cfg.data.clean_html
            )
        elif run == "tfidf_lr_subset":
            row = baselines.tfidf_logreg(splits, clean_html=cfg.data.clean_html)
        else:
            from dataclasses import replace

            whole = data_lib.load_splits(replace(cfg.data, max_train_samples=None), cfg.seed)
            row = baselines.tfidf_logreg(splits, train_rows=whole.train, clean_html=cfg.data.clean_html)
        row.update(
            wall_seconds=time.time() - started,
            load_average=[load_before, load_average()],
            max_length=cfg.data.max_length if run == "linear_probe" else None,
            settings=stamp["settings"],
            commit=source_commit(),
            date=time.strftime("%Y-%m-%d"),
            machine=machine_line(),
            command=shlex.join(
                ["python", "-m", "scalelora.pipeline", "--config", self.recipe, "--runs", run, *self.common]
            ),
        )
        self._save_row(run, stamp, row)
        return row

    def run(self) -> list[dict[str, Any]]:
        self.out.mkdir(parents=True, exist_ok=True)
        needs_teacher = [r for r in self.runs if r in ON_TEACHER or r in KD_RUNS]
        results: dict[str, dict[str, Any]] = {}
        order = list(self.runs)
        if needs_teacher and "teacher_full" not in order and not (self.teacher_dir / "config.json").is_file():
            raise UserError(
                f"--runs {','.join(needs_teacher)} need the teacher in {self.teacher_dir}; add teacher_full to --runs"
            )
        if "tfidf_lr" in order and self.base_cfg.data.max_train_samples:
            order.insert(order.index("tfidf_lr") + 1, "tfidf_lr_subset")
        cache_built = False
        for run in order:
            if run in KD_RUNS and not cache_built:
                self.teacher_logits()
                cache_built = True
            results[run] = self.baseline(run) if run in BASELINE_RUNS else self.train(run)
        self.rows = [self.make_row(run, row) for run, row in results.items()]
        self.write()
        return self.rows

    def gold(self) -> list[str]:
        """The test split's labels in example-id order, the order of every run's `predictions`."""
        from scalelora import data as data_lib

        splits = data_lib.load_splits(self.base_cfg.data, self.base_cfg.seed)
        if splits.test is None:
            return []
        pairs = sorted(zip(splits.test["idx"], splits.test["label"]), key=lambda pair: pair[0])
        if splits.problem_type == data_lib.MULTI_LABEL:  # the list of gold names of each example
            return [[splits.label_names[k] for k, on in enumerate(hot) if on] for _, hot in pairs]
        return [splits.label_names[label] for _, label in pairs]

    def make_row(self, run: str, row: dict[str, Any]) -> dict[str, Any]:
        trainable, total = row["trainable_params"], row["total_params"]
        predictions = row.get("predictions")
        description = DESCRIPTIONS.get(run, f"`{run}`: the recipe with its `pipeline:` line")
        if run in BASELINE_RUNS and "thresholds" in row.get("details", {}):
            description += ", one-vs-rest, thresholds tuned on validation"
        return {
            "dataset": self.recipe,
            "data": self.base_cfg.data.path,
            "run": run,
            "description": description,
            "trainable_params": trainable,
            "total_params": total,
            "trainable_pct": round(100.0 * trainable / total, 4) if total else None,
            "validation": row["eval"].get("validation"),
            "test": row["eval"].get("test"),
            # a multi-label prediction is a list of names: one class means one label set for every row
            "single_class_predictions": len({str(p) for p in predictions}) == 1 if predictions else None,
            "train_seconds": round(row["train_seconds"], 1),
            "wall_seconds": round(row.get("wall_seconds", row["train_seconds"]), 1),
            "resumed_at_steps": row.get("resumed_at_steps", []),
            "num_train_examples": row["num_train_examples"],
            "max_length": row.get("max_length"),
            # when and from which code the run was made (a reused run keeps its own)
            "date": row.get("date") or time.strftime("%Y-%m-%d"),
            "commit": row.get("commit"),
            "machine": row.get("machine") or machine_line(),
            "load_average": row.get("load_average"),
            "peak_memory_gb": row.get("peak_memory_gb"),
            # `run`: the row's own peak; `process`: since the study's process started (see summary.json)
            "peak_memory_scope": row.get("peak_memory_scope"),
            "train_tokens": row.get("train_tokens"),
            "command": row.get("command"),
            "config": row.get("config"),
            "settings": row.get("settings"),
            "autoconfig_rules": row.get("autoconfig_rules"),
            "details": row.get("details", {}),
            "predictions": predictions,
        }

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown_table(self.rows, title=f"### {self.recipe}\n\n"))
        self.log(f"results -> {self.out / 'results.md'}")


def read_predictions(path: Path) -> list[Any] | None:
    """The predicted label of every example of a run's predictions file, in example-id order: under the
    tuned decision rule when the run has one (what the saved model predicts), else the argmax / p >= 0.5
    (multi-label: the list of predicted names)."""
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r.get("tuned", r["predicted"]) for r in records]


def markdown_table(rows: list[dict[str, Any]], title: str = "") -> str:
    """One line per run; with tuned decision rules in the rows (multi-label), the tuned test macro- and
    micro-F1 too."""
    tuned = any("tuned" in (r.get("test") or {}) for r in rows)
    header = ["run", *RUN_COLUMNS[:-1]]
    header += ["test macro-F1 (tuned)", "test micro-F1 (tuned)"] if tuned else []
    header += RUN_COLUMNS[-1:]
    body = []
    for r in rows:
        val, test = r.get("validation") or {}, r.get("test") or {}
        flag = " ⚠ one class only" if r.get("single_class_predictions") else ""
        extra = (
            [(test.get("tuned") or {}).get("macro_f1"), (test.get("tuned") or {}).get("micro_f1")]
            if tuned
            else []
        )
        body.append(
            [
                r["description"] + flag,
                r["trainable_params"],
                r["total_params"],
                fmt(r["trainable_pct"], 2),
                val.get("accuracy"),
                val.get("macro_f1"),
                test.get("accuracy"),
                test.get("macro_f1"),
                *extra,
                fmt(r["train_seconds"], 1),
            ]
        )
    return title + "\n".join(table(header, body)) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scalelora.pipeline",
        description="Teacher full fine-tune -> LoRA students with/without KD, plus baselines, for one recipe.",
        epilog="Overrides: key=value for every trained run, RUN:key=value for one (e.g. teacher_full:train.lr=5e-5).",
    )
    parser.add_argument("--config", required=True, help="a shipped recipe name or a YAML file")
    parser.add_argument("--out", help="output folder (default runs/pipeline/<recipe>)")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument(
        "--fresh", action="store_true", help="recompute runs that finished with the same settings"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("overrides", nargs="*", metavar="[RUN:]key=value")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    name = Path(args.config).stem
    out = Path(args.out or f"runs/pipeline/{name}")
    runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
    pipeline = Pipeline(args.config, out, args.overrides, runs, args.fresh)
    pipeline.run()
    print(markdown_table(pipeline.rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
