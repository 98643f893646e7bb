"""`python -m scalelora.pipeline` end to end on a tiny model and a small slice of the real
rotten_tomatoes data: every run, the teacher wiring, the results files, reuse, and CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scalelora.config import load_config
from scalelora.errors import ConfigError
from scalelora.study.pipeline import Pipeline, main

ROWS = [
    "teacher_full",
    "lora_on_teacher",
    "lora_on_teacher_kd",
    "head_only",
    "linear_probe",
    "lora_base_kd",
    "auto_default",
    "tfidf_lr",
    "tfidf_lr_subset",
]
KEYS = {
    "dataset",
    "run",
    "trainable_params",
    "total_params",
    "trainable_pct",
    "validation",
    "test",
    "train_seconds",
    "date",
    "machine",
    "command",
    "num_train_examples",
    "single_class_predictions",
    "predictions",
}


def tiny(model: Path) -> list[str]:
    return [
        f"model.name={model}",
        "data.max_train_samples=48",
        "data.max_eval_samples=24",
        "data.max_length=32",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "eval.sample_predictions=0",
        "train.log_every=1",
        "teacher_full:train.lr=5e-3",
    ]


@pytest.mark.slow
def test_pipeline_end_to_end_on_real_data(tiny_bert, tmp_path, capsys, monkeypatch):
    out = tmp_path / "rt"
    rows = Pipeline("rotten_tomatoes", out, tiny(tiny_bert)).run()
    assert [r["run"] for r in rows] == ROWS
    saved = json.loads((out / "results.json").read_text())
    assert saved == rows
    by = {r["run"]: r for r in rows}
    for row in rows:
        assert row.keys() >= KEYS and row["dataset"] == "rotten_tomatoes"
        for split in ("validation", "test"):
            assert 0.0 <= row[split]["accuracy"] <= 1.0 and 0.0 <= row[split]["macro_f1"] <= 1.0
    teacher = by["teacher_full"]
    assert teacher["trainable_params"] == teacher["total_params"] and teacher["trainable_pct"] == 100.0
    assert teacher["details"]["steps"] == 6  # 48 examples / 16 per batch * 2 epochs
    for run in ("lora_on_teacher", "lora_on_teacher_kd", "lora_base_kd"):
        assert 0 < by[run]["trainable_pct"] <= 1.5
    assert by["head_only"]["trainable_params"] == 32 * 2 + 2  # the classifier of a 32-wide model
    assert by["linear_probe"]["trainable_params"] == 32 + 1  # binary LR: one weight row and a bias
    assert by["tfidf_lr"]["num_train_examples"] == 8530 and by["tfidf_lr_subset"]["num_train_examples"] == 48
    # every row can be compared example by example: predictions in example-id order, as long as the test split
    gold = Pipeline("rotten_tomatoes", out, tiny(tiny_bert)).gold()
    assert len(gold) == 24
    for row in rows:
        assert len(row["predictions"]) == 24 and set(row["predictions"]) <= {"neg", "pos"}
        assert row["single_class_predictions"] == (len(set(row["predictions"])) == 1)
    # tfidf on the whole train split scores its own predictions: the stored ones must reproduce the metric
    tfidf_acc = sum(p == g for p, g in zip(by["tfidf_lr"]["predictions"], gold)) / 24
    assert tfidf_acc == pytest.approx(by["tfidf_lr"]["test"]["accuracy"])
    teacher_acc = sum(p == g for p, g in zip(by["teacher_full"]["predictions"], gold)) / 24
    assert teacher_acc == pytest.approx(by["teacher_full"]["test"]["accuracy"])
    # the default row takes only the data settings from the recipe, and reproduces with its command
    auto = by["auto_default"]
    assert auto["command"].startswith("python -m scalelora.train --config auto data.path=rotten_tomatoes ")
    assert auto["config"]["recipe"] == "auto" and auto["config"]["lora"]["target_modules"] == ["all-linear"]
    assert teacher["command"].startswith("python -m scalelora.train --config rotten_tomatoes model.mode=full")

    # the students sit on the saved teacher; KD reads the cache of that teacher for the same data
    teacher_dir = out / "teacher_full" / "model"
    for run in ("lora_on_teacher", "lora_on_teacher_kd"):
        assert json.loads((out / run / "summary.json").read_text())["model"] == str(teacher_dir)
    assert json.loads((out / "lora_base_kd" / "summary.json").read_text())["model"] == str(tiny_bert)
    manifest = json.loads((out / "teacher_logits" / "manifest.json").read_text())
    assert (
        manifest["teacher"]["path"] == str(teacher_dir.resolve()) and manifest["splits"]["train"]["complete"]
    )
    for run in ("lora_on_teacher_kd", "lora_base_kd"):
        distill = json.loads((out / run / "summary.json").read_text())["distill"]
        assert distill["teacher"] == "cache" and distill["cache_dir"] == str(out / "teacher_logits")
    table = (out / "results.md").read_text()
    assert table.count("\n| (") == 6 and "| TF-IDF word+char + LR (whole train split) |" in table
    assert "| default, no tuning (`data.path=...` only)" in table

    # a rerun with the same settings reuses every finished run; a changed one recomputes only that
    capsys.readouterr()
    again = Pipeline("rotten_tomatoes", out, [*tiny(tiny_bert), "head_only:train.lr=1e-2"]).run()
    err = capsys.readouterr().err
    assert err.count("reusing the finished run") == 8 and "head_only: training" in err
    assert [r["test"] for r in again if r["run"] != "head_only"] == [
        r["test"] for r in rows if r["run"] != "head_only"
    ]
    # editing one run's line of the recipe's `pipeline:` section retrains that run only
    edited = [*tiny(tiny_bert), "head_only:train.lr=1e-2", "pipeline={lora_base_kd: [train.lr=1e-2]}"]
    Pipeline("rotten_tomatoes", out, edited).run()
    err = capsys.readouterr().err
    assert err.count("reusing the finished run") == 8 and "lora_base_kd: training" in err

    # a setting added to scalelora after a run finished (absent from its saved stamp) keeps the run when it
    # holds its default, and retrains it otherwise
    saved_row = out / "teacher_full" / "pipeline_row.json"
    saved = json.loads(saved_row.read_text())
    del saved["stamp"]["settings"]["train"]["timing_skip_steps"]
    saved_row.write_text(json.dumps(saved))
    Pipeline("rotten_tomatoes", out, edited, ("teacher_full",)).run()
    assert "teacher_full: reusing the finished run" in capsys.readouterr().err
    skip3 = [*edited, "teacher_full:train.timing_skip_steps=3"]
    Pipeline("rotten_tomatoes", out, skip3, ("teacher_full",)).run()
    assert "teacher_full: training" in capsys.readouterr().err
    # a teacher whose weights are gone (an interrupted retraining overwrote its folder) trains again
    (out / "teacher_full" / "model" / "model.safetensors").unlink()
    Pipeline("rotten_tomatoes", out, skip3, ("teacher_full",)).run()
    assert "teacher_full: training" in capsys.readouterr().err
    # and a retraining removes the old row first, so an interrupted one leaves nothing to reuse
    import scalelora.trainer

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(scalelora.trainer, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Pipeline("rotten_tomatoes", out, [*edited, "teacher_full:train.lr=1e-2"], ("teacher_full",)).run()
    assert not (out / "teacher_full" / "pipeline_row.json").exists()


def test_pipeline_cli_errors(tmp_path, capsys):
    assert main(["--config", "rotten_tomatoes", "--out", str(tmp_path), "studnet:train.lr=1"]) == 2
    assert "names run 'studnet'" in capsys.readouterr().err
    assert main(["--config", "rotten_tomatoes", "--out", str(tmp_path), "--runs", "lora_on_teacher"]) == 2
    assert "add teacher_full to --runs" in capsys.readouterr().err
    assert main(["--config", "rotten_tomatoes", "--out", str(tmp_path), "--runs", "bogus"]) == 2
    assert "--runs names ['bogus']" in capsys.readouterr().err


def test_pipeline_on_multi_label_data(tiny_bert, toy_multilabel, tmp_path):
    """A multi-label dataset: the trained runs and the one-vs-rest baselines report micro-F1 and the
    tuned numbers, their test predictions are label sets, and the table shows the tuned columns."""
    overrides = [*tiny(tiny_bert), f"data.path={toy_multilabel}", "data.max_train_samples=null"]
    pipeline = Pipeline(
        "quickstart", tmp_path / "ml", overrides, runs=("head_only", "linear_probe", "tfidf_lr")
    )
    rows = pipeline.run()
    assert [r["run"] for r in rows] == ["head_only", "linear_probe", "tfidf_lr"]
    gold = pipeline.gold()
    assert all(isinstance(g, list) and g for g in gold) and len(gold) == 24  # data.max_eval_samples=24
    for row in rows:
        for split in ("validation", "test"):
            assert {"accuracy", "macro_f1", "micro_f1", "tuned"} <= row[split].keys(), (row["run"], split)
        assert len(row["predictions"]) == 24 and all(isinstance(p, list) for p in row["predictions"])
    by = {r["run"]: r for r in rows}
    for run in ("linear_probe", "tfidf_lr"):
        assert "one-vs-rest, thresholds tuned on validation" in by[run]["description"]
        assert set(by[run]["details"]["thresholds"]) == {"joy", "anger", "fear"}
    assert by["linear_probe"]["trainable_params"] == 3 * (32 + 1)  # one binary LR per label
    # the table's tuned test macro-F1 is the row's, and the trained run's predictions are its tuned ones
    table = (tmp_path / "ml" / "results.md").read_text()
    assert "test macro-F1 (tuned)" in table and f"{by['tfidf_lr']['test']['tuned']['macro_f1']:.4f}" in table
    from scalelora.evaluation import multi_label_metrics

    names = ["joy", "anger", "fear"]
    as_hot = lambda sets: [[int(n in s) for n in names] for s in sets]  # noqa: E731
    again = multi_label_metrics(as_hot(by["head_only"]["predictions"]), as_hot(gold), names)
    assert again["macro_f1"] == pytest.approx(by["head_only"]["test"]["tuned"]["macro_f1"])


def test_the_default_row_keeps_a_precision_its_recipe_pins(tmp_path):
    """The results recipes pin fp32 (their committed rows were trained in it): the `auto_default` row
    keeps it, so its settings, and the stamp a finished run is reused by, stay what they were; a
    recipe that leaves `auto` gives the row `auto`, as a user gets."""
    recipe, overrides = Pipeline("results_emotion", tmp_path / "a", []).run_config("auto_default")
    assert recipe == "auto" and "train.precision=no" in overrides
    assert load_config(recipe, overrides).train.precision == "no"
    recipe, overrides = Pipeline("emotion", tmp_path / "b", []).run_config("auto_default")
    assert not any(o.startswith("train.precision=") for o in overrides)
    assert load_config(recipe, overrides).train.precision == "auto"
    # an override on the command line still wins, named once
    _, overrides = Pipeline("results_emotion", tmp_path / "c", ["train.precision=bf16"]).run_config(
        "auto_default"
    )
    assert [o for o in overrides if o.startswith("train.precision=")] == ["train.precision=bf16"]


def test_recorded_commands_name_each_key_once(tmp_path):
    from scalelora.study.pipeline import last_of_each_key

    assert last_of_each_key(["a=1", "b=x=y", "a=2", "c=3"]) == ["b=x=y", "a=2", "c=3"]
    pipeline = Pipeline("results_emotion", tmp_path, [])
    for run in ("teacher_full", "lora_on_teacher_kd", "lora_base_kd", "auto_default"):
        _, overrides = pipeline.run_config(run)
        keys = [item.split("=", 1)[0] for item in overrides]
        assert len(keys) == len(set(keys)), overrides
    _, teacher = pipeline.run_config("teacher_full")
    # the recipe's line for the run wins over the pipeline's defaults for that stage, as before
    assert "train.lr=1e-4" in teacher and "train.epochs=3" in teacher and "train.lr=0.0001" not in teacher


def test_a_recipe_may_name_runs_of_its_own_each_the_recipe_with_its_line(tmp_path, capsys):
    """Variants (e.g. results_imdb's long-text modes): a name in the recipe's `pipeline:` section that is
    not a standard run is the recipe as shipped with that line on top, trainable by --runs and RUN:key."""
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(
        "data: {path: emotion, max_length: 64}\n"
        "pipeline:\n  short_texts: [data.max_length=16, train.epochs=1]\n  teacher_full: [train.epochs=1]\n"
    )
    pipeline = Pipeline(
        str(recipe), tmp_path / "out", ["short_texts:train.lr=1e-3"], ("short_texts", "tfidf_lr")
    )
    assert pipeline.variants == ("short_texts",)
    name, overrides = pipeline.run_config("short_texts")
    cfg = load_config(name, overrides)
    assert (
        name == str(recipe) and cfg.data.max_length == 16 and cfg.train.epochs == 1 and cfg.train.lr == 1e-3
    )
    assert cfg.model.mode == "lora" and cfg.output_dir == str(tmp_path / "out" / "short_texts")
    with pytest.raises(ConfigError, match="choose from .*short_texts"):
        Pipeline(str(recipe), tmp_path / "out", [], ("long_texts",))
    with pytest.raises(ConfigError, match="names run 'long_texts'"):
        Pipeline(str(recipe), tmp_path / "out", ["long_texts:train.lr=1"], ("short_texts",))
    recipe.write_text("data: {path: emotion}\npipeline:\n  tfidf_lr: [train.lr=1]\n")
    with pytest.raises(ConfigError, match="not a baseline"):
        Pipeline(str(recipe), tmp_path / "out", [])


def test_a_run_may_distil_from_another_run_of_the_study(tiny_bert, toy_data, tmp_path):
    """`distill.teacher=run:NAME` (the decoder study's MiniLM student of the SmolLM2 row): NAME's adapter is
    exported merged, its logits cached on the student's data, and the student trains on that cache."""
    recipe = tmp_path / "study.yaml"
    recipe.write_text(
        "pipeline:\n  big: [train.max_steps=4]\n"
        "  small: [train.max_steps=4, distill.enabled=true, distill.teacher=run:big]\n"
    )
    overrides = [
        f"model.name={tiny_bert}",
        f"data.path={toy_data}",
        "data.max_length=32",
        "train.batch_size=8",
    ]
    out = tmp_path / "out"
    pipeline = Pipeline(str(recipe), out, [*overrides, "eval.sample_predictions=0"], ("big", "small"))
    assert pipeline.source_run("small") == "big" and pipeline.source_run("big") is None
    rows = {r["run"]: r for r in pipeline.run()}
    assert (out / "big" / "merged" / "config.json").is_file()
    manifest = json.loads((out / "big" / "teacher_logits" / "manifest.json").read_text())
    assert str(out / "big" / "merged") in json.dumps(manifest["teacher"])
    small = rows["small"]
    assert "distill.teacher=cache" in small["command"]
    assert f"distill.cache_dir={out / 'big' / 'teacher_logits'}" in small["command"]
    assert small["details"]["distill"]["teacher"] == "cache"
    recipe.write_text("pipeline:\n  small: [distill.enabled=true, distill.teacher=run:small]\n")
    with pytest.raises(ConfigError, match="must name another trained run"):
        Pipeline(str(recipe), out, overrides, ("small",)).source_run("small")


def test_the_baselines_read_the_texts_data_clean_html_gives_the_model(tiny_bert, tmp_path):
    """Under `data.clean_html` the TF-IDF baseline reads the texts without markup, as the model does: on a
    folder where only the markup tells the labels apart, it scores chance cleaned and perfect raw."""
    import random

    from conftest import write_jsonl

    rng, words = random.Random(0), [f"w{i}" for i in range(40)]
    folder = tmp_path / "markup"
    folder.mkdir()
    for split, n in (("train", 200), ("validation", 100), ("test", 100)):
        rows = []
        for i in range(n):
            text, label = " ".join(rng.choice(words) for _ in range(12)), ["plain", "marked"][i % 2]
            rows.append({"text": text.replace(" ", " <br /><br /> ", 1) if i % 2 else text, "label": label})
        write_jsonl(folder / f"{split}.jsonl", rows)
    (folder / "labels.json").write_text(json.dumps(["plain", "marked"]))
    scores = {}
    for clean in ("false", "true"):
        overrides = [*tiny(tiny_bert), f"data.path={folder}", "data.max_eval_samples=null"]
        overrides.append(f"data.clean_html={clean}")
        rows = Pipeline("quickstart", tmp_path / clean, overrides, runs=("tfidf_lr",)).run()
        scores[clean] = next(r for r in rows if r["run"] == "tfidf_lr")["validation"]["accuracy"]
    assert scores["false"] == 1.0 and scores["true"] < 0.65, scores


def test_a_row_resumed_from_its_checkpoint_says_at_which_step(tiny_bert, tmp_path):
    """A study row stopped part-way and continued with `<run>:resume=auto` records the step it resumed at
    (its train time counts both processes; its peak memory and wall time are the last one's)."""
    import shutil

    out = tmp_path / "rt"
    args = [*tiny(tiny_bert), "head_only:checkpoint.every=2", "head_only:checkpoint.keep_last=8"]
    args.append("head_only:resume=auto")
    (whole,) = Pipeline("rotten_tomatoes", out, args, ("head_only",)).run()
    assert whole["resumed_at_steps"] == [] and whole["details"]["steps"] == 6
    run = out / "head_only"
    # what a stop after the step-2 checkpoint leaves: no later checkpoint, no saved model, summary or row
    assert (run / "checkpoints" / "step-2").is_dir()
    for later in [p for p in (run / "checkpoints").iterdir() if p.name != "step-2"] + [run / "model"]:
        shutil.rmtree(later)
    for name in ("summary.json", "pipeline_row.json"):
        (run / name).unlink()
    (resumed,) = Pipeline("rotten_tomatoes", out, args, ("head_only",)).run()
    assert resumed["resumed_at_steps"] == [2] and resumed["details"]["steps"] == 6
    assert json.loads((run / "summary.json").read_text())["resumed_at_steps"] == [2]
