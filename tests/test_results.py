"""`make results` (`studies/results.py`, or `python -m scalelora.study.results`) on a tiny model and slices
of the real data: the DATASETS= selection (short, recipe and folder names), merging into results.json by
(dataset, run), reuse of a finished dataset, paired bootstrap intervals, the rendered files, and the
targets' single-class rule."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT
from scalelora.errors import UserError
from studies import results

TINY_RUNS = "teacher_full,lora_on_teacher"


def tiny(model) -> list[str]:
    return [
        f"model.name={model}",
        "data.max_train_samples=48",
        "data.max_eval_samples=40",
        "data.max_length=32",
        "train.batch_size=16",
        "train.eval_batch_size=32",
        "eval.sample_predictions=0",
        "teacher_full:train.lr=5e-3",
        "teacher_full:train.epochs=1",
        "lora_on_teacher:train.epochs=1",
    ]


def study(tmp_path, model, datasets: str, *extra: str) -> int:
    return results.main(
        [
            "--datasets",
            datasets,
            "--runs",
            TINY_RUNS,
            "--out-root",
            str(tmp_path / "runs"),
            "--results-dir",
            str(tmp_path / "results"),
            *tiny(model),
            *extra,
        ]
    )


@pytest.mark.slow
def test_datasets_merge_into_results_and_a_finished_dataset_is_reused(tiny_bert, tmp_path, capsys):
    assert study(tmp_path, tiny_bert, "codemix_tamil") == 0
    out = tmp_path / "results"
    data = json.loads((out / "results.json").read_text())
    tamil = [r for r in data["results"] if r["dataset"] == "codemix_tamil"]
    assert [r["run"] for r in tamil] == ["teacher_full", "lora_on_teacher"]
    for row in tamil:
        assert row["recipe"] == "results_codemix_tamil" and row["date"] and row["machine"]
        assert row["num_train_examples"] == 48 and "predictions" not in row
        low, high = row["macro_f1_ci"]
        assert low <= row["test"]["macro_f1"] <= high
    assert "vs_teacher_ci" in tamil[1] and "vs_teacher_ci" not in tamil[0]
    assert tamil[0]["max_length"] == 32 and tamil[0]["config"]["train"]["class_weights"] == "balanced"
    assert tamil[0]["command"].startswith(
        "python -m scalelora.train --config results_codemix_tamil model.mode=full"
    )
    saved = json.loads((out / "predictions" / "codemix_tamil.json").read_text())
    assert len(saved["gold"]) == 40 and set(saved["runs"]) == {r["run"] for r in tamil}
    assert (out / "test_macro_f1.png").stat().st_size > 10_000 and (
        out / "confusion_codemix_tamil.png"
    ).is_file()
    page = (out / "RESULTS.md").read_text()
    assert "## codemix_tamil (`--config results_codemix_tamil`" in page and "## Targets" in page

    # another dataset, named by its data folder: the first one's rows stay
    assert study(tmp_path, tiny_bert, "rotten_tomatoes") == 0
    data = json.loads((out / "results.json").read_text())
    assert {r["dataset"] for r in data["results"]} == {"codemix_tamil", "rotten_tomatoes"}
    assert [r for r in data["results"] if r["dataset"] == "codemix_tamil"] == tamil
    # each dataset keeps the versions it ran with, and its section says them
    data["datasets"]["codemix_tamil"]["versions"] = {"torch": "0.0-older"}
    (out / "results.json").write_text(json.dumps(data))
    assert results.main(["--results-dir", str(out), "--render-only"]) == 0
    page = (out / "RESULTS.md").read_text()
    assert "Versions: torch 0.0-older." in page and f"torch {torch.__version__}," in page
    # the invocation's wall time, and the rows' own (reused rows are not retrained, so they differ)
    from scalelora.report import fmt

    minutes = sum(r["wall_seconds"] for r in tamil) / 60
    assert f"the rows' own wall times add up to {fmt(minutes, 1)} min" in page
    data = json.loads((out / "results.json").read_text())

    # the first again, by folder name and by recipe name: reused, nothing trains
    capsys.readouterr()
    assert study(tmp_path, tiny_bert, "tamilmix_fire2020,results_rotten_tomatoes") == 0
    err = capsys.readouterr().err
    assert err.count("reused") == 2 and "training" not in err
    assert json.loads((out / "results.json").read_text())["results"] == data["results"]

    # other settings for one run: that dataset reruns, the pipeline retraining only what changed
    assert study(tmp_path, tiny_bert, "codemix_tamil", "lora_on_teacher:train.lr=1e-3") == 0
    err = capsys.readouterr().err
    assert "teacher_full: reusing" in err and "lora_on_teacher: training" in err

    # --runs one row: it alone is made and replaces its row; the other rows stay, their predictions kept, and
    # the intervals are those of a whole run (the teacher's exactly as before, the student's paired with it)
    whole = json.loads((out / "results.json").read_text())
    before = {r["run"]: r for r in whole["results"]}
    one_run = ["--runs", "lora_on_teacher", "--out-root", str(tmp_path / "runs"), "--results-dir", str(out)]
    assert (
        results.main(
            ["--datasets", "codemix_tamil", *one_run, *tiny(tiny_bert), "lora_on_teacher:train.lr=2e-3"]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "teacher_full: reusing" not in err and "lora_on_teacher: training" in err
    assert "results: codemix_tamil: kept the rows of teacher_full" in err
    after = [
        r
        for r in json.loads((out / "results.json").read_text())["results"]
        if r["dataset"] == "codemix_tamil"
    ]
    assert [r["run"] for r in after] == ["teacher_full", "lora_on_teacher"]
    assert after[0] == before["teacher_full"]
    assert after[1]["config"]["train"]["lr"] == 2e-3 != before["lora_on_teacher"]["config"]["train"]["lr"]
    assert "vs_teacher_ci" in after[1]
    saved = json.loads((out / "predictions" / "codemix_tamil.json").read_text())
    assert set(saved["runs"]) == {"teacher_full", "lora_on_teacher"} and all(saved["runs"].values())
    # the dataset's facts stay the last whole invocation's; the partial one is listed as remade rows
    facts = json.loads((out / "results.json").read_text())["datasets"]["codemix_tamil"]
    (remade,) = facts.pop("remade")
    assert facts == whole["datasets"]["codemix_tamil"]
    assert remade["runs"] == ["lora_on_teacher"] and remade["wall_seconds"] > 0 and remade["finished"]
    assert (
        "Rows remade since by `--runs` (the others kept): lora_on_teacher ("
        in (out / "RESULTS.md").read_text()
    )
    # a kept row must have its predictions: one line naming the way out before anything trains, nothing rewritten
    saved["runs"]["teacher_full"] = None
    (out / "predictions" / "codemix_tamil.json").write_text(json.dumps(saved))
    results_json = (out / "results.json").read_text()
    again = ["--datasets", "codemix_tamil", *one_run, *tiny(tiny_bert), "lora_on_teacher:train.lr=3e-3"]
    assert results.main(again) == 2
    err = capsys.readouterr().err
    assert (
        "no predictions of teacher_full: the rows of teacher_full cannot be kept; run the dataset whole"
        in err
    )
    assert "training" not in err
    assert (out / "results.json").read_text() == results_json


def test_dataset_names_resolve_and_unknown_ones_are_refused():
    assert results.resolve_datasets(["emotion", "results_sst2", "sentimix_hinglish"]) == [
        "emotion",
        "sst2",
        "codemix_hindi",
    ]
    # the two sections of their own, by name or recipe; a folder two of them share names the study's
    assert results.resolve_datasets(["imdb", "results_emotion_decoder", "emotion"]) == [
        "imdb",
        "emotion_decoder",
        "emotion",
    ]
    with pytest.raises(UserError, match="not a study dataset; use emotion"):
        results.resolve_datasets(["ag_news"])


def test_a_single_class_row_misses_its_target_whatever_its_score():
    def row(run, f1, single=False):
        return {
            "dataset": "codemix_tamil",
            "run": run,
            "test": {"macro_f1": f1},
            "single_class_predictions": single,
            "trainable_pct": 0.3,
        }

    checks = results.check_targets(
        [row("teacher_full", 0.80, single=True), row("tfidf_lr", 0.67), row("lora_on_teacher", 0.80)]
    )
    teacher = next(c for c in checks if c["target"].startswith("teacher"))
    assert not teacher["met"] and teacher["note"] == "predicts a single class"
    student = next(c for c in checks if c["target"].startswith("lora_on_teacher"))
    assert student["met"] and student["bar"] == pytest.approx(0.795)


def test_goemotions_is_its_shipped_recipe_against_tfidf_scored_under_tuned_thresholds():
    assert results.resolve_datasets(["goemotions"]) == ["goemotions"]
    assert results.recipe_of("goemotions") == "goemotions"
    assert results.DATASET_RUNS["goemotions"] == ("recipe", "tfidf_lr")

    def row(run, raw, tuned):
        return {"dataset": "goemotions", "run": run, "test": {"macro_f1": raw, "tuned": {"macro_f1": tuned}}}

    # the recipe beats TF-IDF only under the tuned thresholds both rows ship with: that is what counts
    checks = results.check_targets([row("recipe", 0.30, 0.50), row("tfidf_lr", 0.33, 0.48)])
    assert [(c["target"], c["met"]) for c in checks] == [("the recipe >= TF-IDF", True)]
    assert checks[0]["value"] == 0.50 and checks[0]["bar"] == 0.48
    missed = results.check_targets([row("recipe", 0.40, 0.47), row("tfidf_lr", 0.33, 0.48)])
    assert [c["met"] for c in missed] == [False]


def test_the_bar_figure_has_a_bar_for_every_run_a_dataset_has_goemotions_recipe_included():
    def row(dataset, run, f1):
        test = (
            {"macro_f1": f1, "tuned": {"macro_f1": f1 + 0.1}} if dataset == "goemotions" else {"macro_f1": f1}
        )
        return {"dataset": dataset, "run": run, "test": test}

    rows = [
        row("emotion", "teacher_full", 0.89),
        row("emotion", "lora_on_teacher", 0.88),
        row("emotion", "tfidf_lr", 0.82),
        row("goemotions", "recipe", 0.39),
        row("goemotions", "tfidf_lr", 0.38),
    ]
    datasets, width, bars = results.bar_layout(rows)
    assert datasets == ["emotion", "goemotions"] and width == pytest.approx(0.4)
    # the baseline is the dashed line, not a bar; each dataset's bars are centred on its tick
    assert bars == [
        ("teacher_full", pytest.approx(-0.2), 0.89),
        ("lora_on_teacher", pytest.approx(0.2), 0.88),
        ("recipe", pytest.approx(1.0), pytest.approx(0.49)),  # multi-label: under the tuned thresholds
    ]


def test_versions_come_from_metadata_without_importing_peft():
    """Importing peft imports bitsandbytes, which prints a kernel line on CPU: the study reads versions instead."""
    import subprocess
    import sys

    code = (
        "import sys, json; from studies.results import versions; v = versions(); "
        "print(json.dumps([v, 'peft' in sys.modules, 'bitsandbytes' in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    found, peft_loaded, bnb_loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert not peft_loaded and not bnb_loaded
    import accelerate
    import peft
    import transformers

    assert found["torch"] == torch.__version__ and found["peft"] == peft.__version__
    assert found["transformers"] == transformers.__version__ and found["accelerate"] == accelerate.__version__


def test_vectorised_macro_f1_equals_scikit_learn():
    import numpy as np
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    gold = rng.integers(0, 4, size=(20, 50))
    pred = np.where(rng.random((20, 50)) < 0.6, gold, rng.integers(0, 4, size=(20, 50)))
    pred[0] = 0  # one row predicts a single class: the others score 0, as zero_division=0 says
    expected = [
        f1_score(g, p, labels=[0, 1, 2, 3], average="macro", zero_division=0) for g, p in zip(gold, pred)
    ]
    assert results.macro_f1_rows(gold, pred, 4) == pytest.approx(expected)


def test_multi_label_bootstrap_scores_label_sets_by_macro_f1_over_labels():
    from sklearn.metrics import f1_score
    from sklearn.preprocessing import MultiLabelBinarizer

    gold = [["joy"], ["anger", "joy"], ["fear"], ["joy"]] * 25
    pred = [["joy"], ["joy"], ["fear", "joy"], []] * 25
    binarize = MultiLabelBinarizer(classes=["anger", "fear", "joy"])
    point = f1_score(binarize.fit_transform(gold), binarize.transform(pred), average="macro", zero_division=0)
    intervals = results.bootstrap(gold, {"recipe": pred}, None, samples=300)
    low, high = intervals["recipe"]["macro_f1_ci"]
    assert low <= point <= high and high - low < 0.2 and "vs_teacher_ci" not in intervals["recipe"]
    assert results.test_macro_f1({"test": {"macro_f1": 0.1, "tuned": {"macro_f1": 0.4}}}) == 0.4


def test_paired_bootstrap_intervals_contain_the_point_and_see_a_clear_gap():
    from sklearn.metrics import f1_score

    gold = ["a", "b"] * 100
    flip = {"a": "b", "b": "a"}
    # wrong both ways (a perfect run's interval is the point [1, 1], which any resampling contains):
    # the teacher on 40 rows (macro-F1 0.8), the student on 80 (0.6)
    runs = {
        "teacher_full": [flip[g] if i % 10 in (0, 5) else g for i, g in enumerate(gold)],
        "student": [flip[g] if i % 5 in (0, 1) else g for i, g in enumerate(gold)],
    }
    intervals = results.bootstrap(gold, runs, "teacher_full", samples=1000)
    point = {run: f1_score(gold, pred, average="macro") for run, pred in runs.items()}
    for run in runs:
        low, high = intervals[run]["macro_f1_ci"]
        assert low < point[run] < high and high - low < 0.3, (run, point[run], low, high)
    low, high = intervals["student"]["vs_teacher_ci"]
    gap = point["student"] - point["teacher_full"]
    assert low < gap < high < -0.1, (gap, low, high)  # the student is worse on every resample
    assert "vs_teacher_ci" not in intervals["teacher_full"]


def committed(dataset: str, run: str) -> dict:
    data = json.loads((ROOT / "results" / "results.json").read_text())
    return next(r for r in data["results"] if r["dataset"] == dataset and r["run"] == run)


def staleness(row: dict, *overrides: str) -> list[str]:
    from scalelora.study.pipeline import Pipeline

    pipeline = Pipeline(
        results.recipe_of(row["dataset"]), ROOT / "runs" / "x", list(overrides), (row["run"],)
    )
    return results.row_differences(row, pipeline)


def test_a_committed_row_stays_current_until_what_it_ran_changes_key_by_key():
    """A row is compared with what its recipe runs today key by key: a key the row does not record counts
    as its declared `before` value (a new key that keeps the old behaviour retrains nothing), a changed
    value of any key that changes what is measured makes it out of date, and so does a changed default."""
    import copy

    teacher = committed("sst2", "teacher_full")  # trained at a commit that recorded train.mask_dropout
    # its model.gradient_checkpointing is false; today's default `auto` means false on a float base
    assert teacher["config"]["model"]["gradient_checkpointing"] is False
    assert staleness(teacher) == []
    assert staleness(teacher, "model.gradient_checkpointing=true") == [
        "model.gradient_checkpointing: False then, True now"
    ]
    # a key added later whose default is the behaviour before it: nothing to retrain
    older = copy.deepcopy(teacher)
    del older["config"]["train"]["label_smoothing"]
    assert staleness(older) == []
    # a key added later whose default changed the behaviour: the row predates it, so it is out of date
    del older["config"]["train"]["mask_dropout"]
    assert staleness(older) == ["train.mask_dropout: False then (before the key), True now"]
    # a changed setting (as a changed default would be), and where a run is managed changes nothing
    assert staleness(teacher, "train.weight_decay=0.02") == ["train.weight_decay: 0.01 then, 0.02 now"]
    assert staleness(teacher, "train.log_every=7", "checkpoint.every=100", "output_dir=elsewhere") == []
    # a student's base is the study's own teacher, named by path: another checkout's path is the same base
    student = copy.deepcopy(committed("sst2", "lora_on_teacher"))
    student["config"]["model"]["name"] = "/elsewhere/runs/results/sst2/teacher_full/model"
    assert staleness(student) == []


def test_the_default_row_compares_the_rules_that_chose_its_settings(monkeypatch):
    import copy

    from scalelora import autoconfig

    committed_row = committed("sst2", "auto_default")
    rules = committed_row.get("autoconfig_rules") or 1
    default = copy.deepcopy(committed_row)
    default["autoconfig_rules"] = autoconfig.RULES_VERSION
    assert staleness(default) == []  # the data-chosen keys differ from the recipe's, by design
    if rules == 2:  # version 3 (markup cleaning) does not reach sst2, which has none
        assert autoconfig.RULES_VERSION == 3 and staleness(committed_row) == []
    monkeypatch.setattr(autoconfig, "RULES_VERSION", autoconfig.RULES_VERSION + 1)
    assert staleness(default) == [
        f"autoconfig rules: version {autoconfig.RULES_VERSION - 1} then, {autoconfig.RULES_VERSION} now"
    ]
    assert staleness(committed_row) == [
        f"autoconfig rules: version {rules} then, {autoconfig.RULES_VERSION} now"
    ]
    # listed under the table with the command that retrains that row alone
    (note,) = [n for n in results.row_notes("sst2", [default]) if n.startswith("- Out of date")]
    assert note.endswith(
        '`make results DATASETS=sst2 RESULTS_ARGS="--runs auto_default"` retrains it alone.'
    ), note


def test_a_resumed_row_is_noted_under_its_table_with_the_steps_it_resumed_at():
    import copy

    row = copy.deepcopy(committed("imdb", "head_tail_512"))
    assert not [n for n in results.row_notes("imdb", [row]) if n.startswith("- Resumed")]
    row["resumed_at_steps"] = [192, 448]
    (note,) = [n for n in results.row_notes("imdb", [row]) if n.startswith("- Resumed")]
    assert note == (
        f"- Resumed: {row['description']} continued from its checkpoint at steps 192, 448 (`resume=auto`): its "
        "train time counts the training its checkpoints kept and the last process's, its peak memory and its wall "
        "time the last process's alone."
    )
    row["resumed_at_steps"] = [64]
    assert "continued from its checkpoint at step 64 (`resume=auto`)" in "".join(
        results.row_notes("imdb", [row])
    )


def test_a_stop_signal_mid_row_is_one_line_and_the_preempted_exit_code(tmp_path, monkeypatch, capsys):
    """SIGTERM to `make results` stops the row training with a checkpoint (tests/test_preemption.py): the study
    exits 75, as the CLI does, with one line naming the run to resume, and writes nothing."""
    from scalelora.trainer import Preempted

    checkpoint = tmp_path / "runs" / "imdb" / "auto_default" / "checkpoints" / "step-870"

    def stopped(*args, **kwargs):
        raise Preempted("SIGTERM", checkpoint)

    monkeypatch.setattr(results, "run_dataset", stopped)
    out = tmp_path / "results"
    argv = ["--datasets", "imdb", "--runs", "auto_default", "--out-root", str(tmp_path / "runs")]
    assert results.main([*argv, "--results-dir", str(out)]) == 75
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"results: imdb: stopped by SIGTERM; checkpoint {checkpoint}; rerun the same command with "
        "auto_default:resume=auto to continue it"
    )
    assert list(out.iterdir()) == []


def test_baselines_compare_their_data_settings_and_every_row_names_its_code():
    import subprocess

    tfidf = committed("sst2", "tfidf_lr")
    assert staleness(tfidf) == []
    assert staleness(tfidf, "data.max_length=64") == ["settings"]
    data = json.loads((ROOT / "results" / "results.json").read_text())
    git = (ROOT / ".git").exists()
    for row in data["results"]:
        code = row.get("commit") or row.get("committed_with")
        assert code, f"{row['dataset']} {row['run']} records no commit"
        if git:
            sha = code.split("-")[0]
            assert subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", sha]).returncode == 0, code


def test_targets_on_a_setting_chosen_after_a_test_look_are_counted_apart():
    """emotion's run (6) class weights and codemix_hindi's teacher learning rate were chosen after a look
    at test scores: their targets (and the students' targets whose bar is that teacher) are marked."""
    data = json.loads((ROOT / "results" / "results.json").read_text())
    targets = results.check_targets(data["results"])
    looked = {(t["dataset"], t["target"].split(" ")[0]) for t in targets if t["test_look"]}
    assert looked == {
        ("emotion", "lora_base_kd"),
        ("codemix_hindi", "teacher"),
        ("codemix_hindi", "lora_on_teacher"),
        ("codemix_hindi", "lora_on_teacher_kd"),
        ("codemix_hindi", "lora_base_kd"),
    }
    page = "\n".join(results.targets_section(targets))
    # the six datasets' targets; the long-document and decoder sections are counted apart, each its own line
    clean = [t for t in targets if not t["test_look"] and not t.get("section")]
    assert (
        f"{sum(t['met'] for t in clean)} of {len(clean)} targets met with every setting chosen on validation"
        in page
    )
    decoder = [t for t in targets if t.get("section") == results.DECODER]
    assert f"decoders (emotion on SmolLM2): {sum(t['met'] for t in decoder)} of {len(decoder)} met" in page
    # a rerun with a setting chosen on validation clears the label
    row = committed("emotion", "lora_base_kd")
    assert results.test_look(row)
    row["config"]["train"]["class_weights"] = "none"
    assert results.test_look(row) is None


def test_the_documented_command_renders_the_committed_results_md_from_results_json(tmp_path):
    """`python -m scalelora.study.results --render-only` (the package's entry point to studies/results.py)
    turns the committed results.json into the committed RESULTS.md, byte for byte, from any directory."""
    import shutil
    import subprocess
    import sys

    shutil.copy(ROOT / "results" / "results.json", tmp_path / "results.json")
    command = [sys.executable, "-m", "scalelora.study.results", "--render-only", "--results-dir", "."]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "RESULTS.md").read_text() == (ROOT / "results" / "RESULTS.md").read_text()
    assert (tmp_path / "test_macro_f1.png").is_file()


def test_the_entry_point_without_a_checkout_is_one_line(tmp_path, monkeypatch, capsys):
    from scalelora.study import results as entry

    monkeypatch.setattr(entry, "ROOT", tmp_path)  # an installed package: no studies/ beside it
    assert entry.main(["--render-only"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "studies/results.py of a scalelora checkout" in err


def row(
    dataset: str, run: str, accuracy: float, macro_f1: float | None = None, validation: float | None = None
) -> dict:
    return {
        "dataset": dataset,
        "run": run,
        "test": {"accuracy": accuracy, "macro_f1": accuracy if macro_f1 is None else macro_f1},
        "validation": {"accuracy": accuracy if validation is None else validation},
    }


def test_the_long_document_and_decoder_targets_are_their_issues_and_counted_apart():
    rows = [
        row("imdb", "tfidf_lr", 0.900),
        row("imdb", "truncate_256", 0.905),
        row("imdb", "head_tail_512", 0.916),
        row("imdb", "chunk", 0.914),
        row("imdb", "auto_default", 0.899),
        row("emotion_decoder", "smollm2_lora", 0.912),
        row("emotion_decoder", "smollm2_lora_4bit", 0.9015),
        row("emotion_decoder", "minilm_from_smollm2", 0.92, macro_f1=0.881),
        row("emotion", "lora_on_teacher", 0.93, macro_f1=0.8908),
    ]
    targets = {(t["dataset"], t["target"]): t for t in results.check_targets(rows)}
    best = targets[("imdb", "long-text row best on validation (head_tail_512) >= TF-IDF + 1 pt (accuracy)")]
    assert best["met"] and best["bar"] == pytest.approx(0.910) and best["section"] == "imdb"
    assert targets[
        ("imdb", "long-text row best on validation (head_tail_512) >= truncate-256 + 1 pt (accuracy)")
    ]["met"]
    assert not targets[("imdb", "default (no tuning) >= TF-IDF (accuracy)")]["met"]
    assert targets[("emotion_decoder", "D1 >= 0.91 (accuracy)")]["met"]
    four_bit = targets[("emotion_decoder", "D2 >= D1 - 1 pt (accuracy)")]
    assert not four_bit["met"] and four_bit["bar"] == pytest.approx(0.902)
    student = targets[("emotion_decoder", "D3 >= emotion's (2) - 1 pt")]
    assert student["met"] and student["bar"] == pytest.approx(0.8808)
    page = "\n".join(results.targets_section(list(targets.values())))
    assert "long documents (imdb): 2 of 3 met" in page and "decoders (emotion on SmolLM2): 2 of 3 met" in page
    assert "0 of 0 targets met with every setting chosen on validation (the six datasets)" in page
    # the best long-text row is the best on validation, whatever test says: chunk's higher test accuracy
    # does not make it the best when head_tail is better on validation
    rows[3] = row("imdb", "chunk", 0.950, validation=0.915)
    rows[2] = row("imdb", "head_tail_512", 0.9105, validation=0.920)
    targets = {(t["dataset"], t["target"]): t for t in results.check_targets(rows)}
    best = targets[("imdb", "long-text row best on validation (head_tail_512) >= TF-IDF + 1 pt (accuracy)")]
    assert best["met"] and best["value"] == pytest.approx(0.9105)
    assert not targets[
        ("imdb", "long-text row best on validation (head_tail_512) >= truncate-256 + 1 pt (accuracy)")
    ]["met"]


def test_the_decoder_section_says_how_often_d2_gives_d1s_label(tmp_path):
    """Agreement on test: the share of texts D2 labels as D1 does, from the predictions file, kept in
    results.json (so --render-only needs no predictions) and said under the decoder table."""
    predictions = tmp_path / "emotion_decoder.json"
    d1 = ["joy", "sadness", "anger", "joy", "fear"]
    d2 = ["joy", "sadness", "joy", "joy", "love"]
    predictions.write_text(json.dumps({"gold": d1, "runs": {"smollm2_lora": d1, "smollm2_lora_4bit": d2}}))
    agreement = results.agreement_on_test(predictions, "smollm2_lora_4bit", "smollm2_lora")
    assert agreement == {
        "run": "smollm2_lora_4bit",
        "reference": "smollm2_lora",
        "same": 3,
        "of": 5,
        "share": 0.6,
    }
    # a run not yet trained: no agreement, no line
    predictions.write_text(json.dumps({"gold": d1, "runs": {"smollm2_lora": d1}}))
    assert results.agreement_on_test(predictions, "smollm2_lora_4bit", "smollm2_lora") is None
    predictions.write_text(
        json.dumps({"gold": d1, "runs": {"smollm2_lora": d1, "smollm2_lora_4bit": d2[:4]}})
    )
    with pytest.raises(ValueError, match="4 test predictions"):
        results.agreement_on_test(predictions, "smollm2_lora_4bit", "smollm2_lora")

    committed = json.loads((ROOT / "results" / "results.json").read_text())
    rows = [r for r in committed["results"] if r["dataset"] == "emotion_decoder"]
    data = {
        "datasets": {"emotion_decoder": {**committed["datasets"]["emotion_decoder"], "agreement": agreement}}
    }
    section = "\n".join(results.dataset_section("emotion_decoder", rows, data, {}))
    assert "Agreement on test: (D2) gives the label (D1) gives to 3 of 5 texts (0.6000)." in section


def test_a_section_gives_its_rows_max_length_once_or_each_rows_where_they_differ():
    rows = [
        {"description": "teacher", "max_length": 64},
        {"description": "TF-IDF", "max_length": None},
        {"description": "student", "max_length": 64},
    ]
    assert results.max_length_fact(rows) == "max_length 64"
    rows.append({"description": "chunk", "max_length": 256})
    assert results.max_length_fact(rows) == "max_length 64 for teacher, 64 for student, 256 for chunk"
    assert results.max_length_fact(rows[1:2]) == "max_length: none yet (baseline rows only)"


def test_the_imdb_chunk_row_pools_as_the_committed_validation_sweep_chose():
    """results_imdb's `chunk` row takes the pooling that did best on validation in the committed sweep
    (results/sweeps/imdb_chunk_pool: the same windows, each pooling, validation only: no test split was read)."""
    from scalelora.config import load_config

    sweep = json.loads((ROOT / "results" / "sweeps" / "imdb_chunk_pool" / "sweep.json").read_text())
    assert sweep["recipe"] == "results_imdb" and list(sweep["axes"]) == ["data.chunk_pool"]
    assert "data.test_split=null" in sweep["fixed"]
    runs = sweep["runs"]
    assert {r["data.chunk_pool"] for r in runs} == {"mean", "max", "logmeanexp"}
    assert all(r["status"] == "done" and r["test_accuracy"] is None and r["machine"] for r in runs)
    best = max(runs, key=lambda r: r[sweep["metric"]])["data.chunk_pool"]
    recipe = load_config("results_imdb")
    line = recipe.pipeline["chunk"]
    assert f"data.chunk_pool={best}" in line
    # the sweep's windows are the row's: the same mode, window and stride, and the same documents a step
    fixed = [
        item
        for item in sweep["fixed"]
        if not item.startswith(("train.max_steps", "eval.every", "data.test_split"))
    ]
    assert set(fixed) == {item for item in line if not item.startswith("data.chunk_pool")}
