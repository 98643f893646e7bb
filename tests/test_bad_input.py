"""Each bad input a user can give: exit code 2, one `scalelora: error: ...` line naming the fix,
no traceback, and nothing left in output_dir that looks like a finished run.

The table in docs/reliability.md (Bad input) lists these cases; `BAD_INPUTS` here is its source of truth
(a test checks the two agree).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (
    ROOT,
    save_tiny_classifier,
    tiny_overrides,
    write_jsonl,
    write_toy_dataset,
    write_toy_multilabel_dataset,
)
from scalelora import predict, train

FINISHED_RUN_MARKERS = ("summary.json", "adapter", "model", "checkpoints", "config.yaml", "metrics.jsonl")


def run_train(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Run the real CLI in-process; return (exit code, stderr)."""
    capsys.readouterr()
    code = train.main(argv)
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit code 2, exactly one error line (with every fragment in it), no traceback."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("scalelora: error:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_no_finished_run(out: Path) -> None:
    left = [name for name in FINISHED_RUN_MARKERS if (out / name).exists()]
    assert not left, f"{out} holds {left} after a failed start"
    assert not (out / ".lock").exists(), "the run lock was not released"


@dataclass
class Case:
    """One bad input: how to make it (returns CLI argv), and what the error line must contain."""

    name: str
    input: str
    build: Callable[[Path, Path, Path], list[str]]
    expect: tuple[str, ...]
    cli: str = "train"
    """The CLI the argv is for: `train` or `predict`."""


def tiny(model: Path, data: Path, out: Path, **extra: object) -> list[str]:
    return ["--config", "quickstart", *tiny_overrides(model, data, out, **extra)]


def copy_data(data: Path, tmp: Path) -> Path:
    target = tmp / "data"
    shutil.copytree(data, target)
    return target


def edit_line(path: Path, number: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[number - 1] = text
    path.write_text("\n".join(lines) + "\n")


def set_row(path: Path, number: int, **values: object) -> None:
    lines = path.read_text().splitlines()
    row = json.loads(lines[number - 1])
    row.update(values)
    lines[number - 1] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")


# --- config ---------------------------------------------------------------------------------------


def unknown_key(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"lora.rank": 8})


def wrong_type(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"train.batch_size": "eight"})


def bad_enum(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"train.precision": "fp8"})


def zero_size(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"train.batch_size": 0})


def negative_size(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"lora.r": -4})


def out_of_range(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"lora.dropout": 1.5})


def class_weights_unknown_label(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"train.class_weights": "{neg: 1, happy: 2}"})


def class_weights_not_positive(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"train.class_weights": "{neg: 0, pos: 1}"})


def focal_gamma_negative(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"train.loss": "focal", "train.focal_gamma": -1})


def conflicting(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"model.load_in_8bit": "true", "model.load_in_4bit": "true"})


def recipe_not_found(model: Path, data: Path, tmp: Path) -> list[str]:
    return ["--config", "quikstart", f"output_dir={tmp / 'out'}"]


def malformed_override(model: Path, data: Path, tmp: Path) -> list[str]:
    return [*tiny(model, data, tmp / "out"), "lora.r"]


def invalid_yaml(model: Path, data: Path, tmp: Path) -> list[str]:
    recipe = tmp / "broken.yaml"
    recipe.write_text("train:\n  lr: [1e-3\n")
    return ["--config", str(recipe), f"output_dir={tmp / 'out'}"]


def section_as_value(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", lora=4)


def non_finite(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"train.lr": ".nan"})


def recipe_path(model: Path, data: Path, tmp: Path) -> list[str]:
    return ["--config", "quickstart", "recipe=../../x"]


# --- data -----------------------------------------------------------------------------------------


def missing_data(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, tmp / "no-such-data", tmp / "out")


def missing_split(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    (folder / "validation.jsonl").unlink()
    return tiny(model, folder, tmp / "out")


def corrupt_jsonl(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    edit_line(folder / "train.jsonl", 7, '{"text": "a cut-off line", "lab')
    return tiny(model, folder, tmp / "out")


def jsonl_not_object(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    edit_line(folder / "validation.jsonl", 3, '["a list", "pos"]')
    return tiny(model, folder, tmp / "out")


def corrupt_csv(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = tmp / "csvdata"
    folder.mkdir()
    for split in ("train", "validation"):
        rows = [json.loads(line) for line in (data / f"{split}.jsonl").read_text().splitlines()]
        lines = ["text,label"] + [f"{r['text']},{r['label']}" for r in rows]
        lines[4] = "an unquoted, comma in the text,pos"
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return tiny(model, folder, tmp / "out")


def not_utf8(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    path = folder / "train.jsonl"
    raw = path.read_bytes().split(b"\n")
    raw[5] = b'{"text": "caf\xe9 latin-1", "label": "pos"}'
    path.write_bytes(b"\n".join(raw))
    return tiny(model, folder, tmp / "out")


def missing_column(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"data.text_column": "sentence"})


def unknown_label(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    set_row(folder / "validation.jsonl", 4, label="neutral")
    return tiny(model, folder, tmp / "out")


def float_label(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = write_toy_dataset(tmp / "ints", labels_json=False)
    for split in ("train", "validation", "test"):
        path = folder / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        write_jsonl(path, [{"text": r["text"], "label": int(r["label"] == "pos")} for r in rows])
    set_row(folder / "train.jsonl", 10, label=0.5)
    return tiny(model, folder, tmp / "out")


def out_of_range_label(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    set_row(folder / "validation.jsonl", 2, label=7)
    return tiny(model, folder, tmp / "out")


def null_label(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    set_row(folder / "validation.jsonl", 2, label=None)
    return tiny(model, folder, tmp / "out")


def empty_text(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    set_row(folder / "train.jsonl", 12, text="   ")
    return tiny(model, folder, tmp / "out")


def single_class_train(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    path = folder / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, [{"text": r["text"], "label": "pos"} for r in rows])
    return tiny(model, folder, tmp / "out")


def all_filtered(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    path = folder / "validation.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    write_jsonl(path, [{"text": r["text"], "label": "neg"} for r in rows])
    (folder / "labels.json").write_text(json.dumps(["neg", "pos", "meh"]))
    return tiny(model, folder, tmp / "out", **{"data.keep_labels": "[pos,meh]"})


def unknown_keep_label(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"data.keep_labels": "[pos,positive]"})


def bad_labels_json(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    (folder / "labels.json").write_text('{"neg": 0, "pos": 1}')
    return tiny(model, folder, tmp / "out")


def text_too_long(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = copy_data(data, tmp)
    set_row(folder / "train.jsonl", 3, text=" ".join(["great"] * 400))
    # the tiny model has 128 positions; 512 tokens would index past its position table
    return tiny(model, folder, tmp / "out", **{"data.max_length": 512})


# --- multi-label data, calibration and decision rules ---------------------------------------------


def multilabel_data(tmp: Path) -> Path:
    return write_toy_multilabel_dataset(tmp / "multi")


def unknown_name_in_list(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = multilabel_data(tmp)
    set_row(folder / "validation.jsonl", 5, label=["joy", "glee"])
    return tiny(model, folder, tmp / "out")


def empty_label_list(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = multilabel_data(tmp)
    set_row(folder / "train.jsonl", 8, label=[])
    return tiny(model, folder, tmp / "out")


def mixed_label_rows(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = multilabel_data(tmp)
    set_row(folder / "train.jsonl", 4, label="fear")
    return tiny(model, folder, tmp / "out")


def class_balanced_multilabel(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, multilabel_data(tmp), tmp / "out", **{"data.class_balanced": "true"})


def calibrated_teacher_without_temperature(model: Path, data: Path, tmp: Path) -> list[str]:
    teacher = save_tiny_classifier(tmp / "teacher", model)  # a trained head, but no calibration.json
    extra = {"distill.enabled": "true", "distill.calibrated_teacher": "true"}
    return tiny(teacher, data, tmp / "out", **extra)


def untrained_adapter(model: Path, tmp: Path, labels: list[str]) -> Path:
    """An adapter folder as training writes it (weights, tokenizer, scalelora.json, labels.json), untrained."""
    from transformers import AutoTokenizer

    from scalelora.config import LoraConfig, ModelConfig
    from scalelora.models import build_model

    folder = tmp / "adapter"
    build_model(ModelConfig(name=str(model)), LoraConfig(), labels).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model).save_pretrained(folder)
    meta = {
        "model_name": str(model),
        "mode": "lora",
        "labels": labels,
        "max_length": 32,
        "problem_type": "single_label",
    }
    (folder / "scalelora.json").write_text(json.dumps(meta))
    (folder / "labels.json").write_text(json.dumps(labels))
    return folder


def calibration_for_other_labels(model: Path, data: Path, tmp: Path) -> list[str]:
    folder = untrained_adapter(model, tmp, ["neg", "pos"])
    other = {"format": 1, "problem_type": "single_label", "labels": ["neg", "happy"], "temperature": 1.5}
    (folder / "calibration.json").write_text(json.dumps(other))
    return ["--adapter", str(folder), "--text", "a fine film"]


def top_k_on_single_label(model: Path, data: Path, tmp: Path) -> list[str]:
    return [
        "--adapter",
        str(untrained_adapter(model, tmp, ["neg", "pos"])),
        "--text",
        "a fine film",
        "--top-k",
        "2",
    ]


# --- model ----------------------------------------------------------------------------------------


def model_not_found(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(tmp / "no-such-model", data, tmp / "out")


def no_classification_head(model: Path, data: Path, tmp: Path) -> list[str]:
    from transformers import CLIPVisionConfig

    folder = tmp / "vision-model"
    shutil.copytree(model, folder)
    (folder / "model.safetensors").unlink()
    config = CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    config.save_pretrained(folder)
    return tiny(folder, data, tmp / "out")


def label_count_mismatch(model: Path, data: Path, tmp: Path) -> list[str]:
    from transformers import AutoModelForSequenceClassification

    folder = tmp / "three-class"
    head = AutoModelForSequenceClassification.from_pretrained(
        model, num_labels=3, id2label={0: "sad", 1: "neutral", 2: "happy"}
    )
    head.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model / name, folder / name)
    return tiny(folder, data, tmp / "out")


def no_lora_preset(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", **{"lora.target_modules": "[no_such_proj]"})


# --- resume / output_dir --------------------------------------------------------------------------


def resume_missing(model: Path, data: Path, tmp: Path) -> list[str]:
    return tiny(model, data, tmp / "out", resume=tmp / "out" / "checkpoints" / "step-3")


def resume_incomplete(model: Path, data: Path, tmp: Path) -> list[str]:
    partial = tmp / "elsewhere" / "step-3"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"\0" * 64)
    return tiny(model, data, tmp / "out", resume=partial)


def self_kd_untrained_head(model: Path, data: Path, tmp: Path) -> list[str]:
    # the tiny base is a bare encoder: its classification head is newly initialised
    return tiny(model, data, tmp / "out", **{"distill.enabled": "true", "distill.teacher": "self"})


BAD_INPUTS = [
    Case("unknown_key", "unknown config key `lora.rank=8`", unknown_key, ("lora.rank", "lora.r")),
    Case("wrong_type", "wrong type `train.batch_size=eight`", wrong_type, ("train.batch_size", "integer")),
    Case("bad_enum", "bad enum value `train.precision=fp8`", bad_enum, ("train.precision", "bf16")),
    Case("zero_size", "zero size `train.batch_size=0`", zero_size, ("train.batch_size", "positive")),
    Case("negative_size", "negative size `lora.r=-4`", negative_size, ("lora.r", "positive")),
    Case("out_of_range", "value out of range `lora.dropout=1.5`", out_of_range, ("lora.dropout", "[0, 1)")),
    Case(
        "class_weights_unknown_label",
        "`train.class_weights={neg: 1, happy: 2}` naming a label the data does not have",
        class_weights_unknown_label,
        ("train.class_weights", "happy", "not labels of this data"),
    ),
    Case(
        "class_weights_not_positive",
        "a zero or negative class weight `train.class_weights={neg: 0, pos: 1}`",
        class_weights_not_positive,
        ("train.class_weights", "positive", "data.keep_labels"),
    ),
    Case(
        "focal_gamma_negative",
        "`train.focal_gamma=-1`",
        focal_gamma_negative,
        ("train.focal_gamma", ">= 0"),
    ),
    Case(
        "conflicting",
        "conflicting options `model.load_in_8bit=true model.load_in_4bit=true`",
        conflicting,
        ("load_in_8bit", "load_in_4bit", "pick one"),
    ),
    Case(
        "recipe_not_found",
        "recipe not found `--config quikstart`",
        recipe_not_found,
        ("quikstart", "quickstart"),
    ),
    Case(
        "malformed_override",
        "override without `=` (`lora.r`)",
        malformed_override,
        ("lora.r", "dotted.key=value"),
    ),
    Case("invalid_yaml", "a recipe file that is not valid YAML", invalid_yaml, ("broken.yaml", "YAML")),
    Case(
        "section_as_value",
        "a section given a value `lora=4`",
        section_as_value,
        ("lora", "mapping", "lora.KEY=VALUE"),
    ),
    Case(
        "non_finite",
        "a non-finite number (`train.lr=.nan`, `lora.alpha=1e400`)",
        non_finite,
        ("train.lr", "finite number"),
    ),
    Case(
        "recipe_path",
        "`recipe=../../x` (the default `output_dir` is `runs/<recipe>`)",
        recipe_path,
        ("recipe", "plain name", "output_dir"),
    ),
    Case("missing_data", "data folder or dataset that does not exist", missing_data, ("no-such-data",)),
    Case(
        "missing_split",
        "no `validation` file in the data folder",
        missing_split,
        ("validation", "data.eval_split"),
    ),
    Case(
        "corrupt_jsonl",
        "a cut-off JSONL line",
        corrupt_jsonl,
        ("train.jsonl:7", "not valid JSON", "fix or remove"),
    ),
    Case(
        "jsonl_not_object",
        "a JSONL line that is a list, not an object",
        jsonl_not_object,
        ("validation.jsonl:3", "JSON object"),
    ),
    Case("corrupt_csv", "a CSV line with an unquoted comma", corrupt_csv, ("train.csv:5", "quote")),
    Case("not_utf8", "a data file that is not UTF-8", not_utf8, ("train.jsonl:6", "UTF-8")),
    Case(
        "missing_column",
        "missing text column (`data.text_column=sentence`)",
        missing_column,
        ("sentence", "data.text_column"),
    ),
    Case(
        "unknown_label", "a validation label not in the label map", unknown_label, ("neutral", "labels.json")
    ),
    Case("float_label", "a float label (`0.5`)", float_label, ("0.5", "integer")),
    Case(
        "out_of_range_label", "an integer label beyond the label count", out_of_range_label, ("7", "0..K-1")
    ),
    Case("null_label", "a missing (null) label", null_label, ("None", "validation", "remove the row")),
    Case("empty_text", "an empty text", empty_text, ("empty text", "data.drop_empty")),
    Case("all_filtered", "a split empty after `data.keep_labels`", all_filtered, ("empty after filtering",)),
    Case(
        "single_class_train",
        "a training split with one class",
        single_class_train,
        ("train.jsonl", "every training row has the label 'pos'", "at least 2 classes"),
    ),
    Case(
        "unknown_keep_label",
        "`data.keep_labels` naming an unknown label",
        unknown_keep_label,
        ("positive", "data.keep_labels"),
    ),
    Case(
        "bad_labels_json",
        "`labels.json` that is not a list of names",
        bad_labels_json,
        ("labels.json", "list"),
    ),
    Case(
        "text_too_long",
        "text longer than the model handles (`data.max_length` above its positions)",
        text_too_long,
        ("128", "data.max_length"),
    ),
    Case(
        "model_not_found",
        "`model.name` that does not exist",
        model_not_found,
        ("no-such-model", "model.name", "alias"),
    ),
    Case(
        "no_classification_head",
        "a model with no sequence-classification head (a vision model)",
        no_classification_head,
        ("vision-model", "sequence classifier", "sequence-classification head"),
    ),
    Case(
        "label_count_mismatch",
        "a classifier whose head has other labels than the data",
        label_count_mismatch,
        ("three-class", "labels"),
    ),
    Case(
        "no_lora_preset",
        "`lora.target_modules` naming no module of the model",
        no_lora_preset,
        ("lora.target_modules", "no_such_proj"),
    ),
    Case(
        "resume_missing",
        "`resume=PATH` to a checkpoint that does not exist",
        resume_missing,
        ("step-3", "resume=auto"),
    ),
    Case(
        "resume_incomplete",
        "`resume=PATH` to a half-written checkpoint",
        resume_incomplete,
        ("step-3", "incomplete", "resume=auto"),
    ),
    Case(
        "self_kd_untrained_head",
        "`distill.teacher=self` on a base whose classification head is newly initialised",
        self_kd_untrained_head,
        ("distill.teacher=self", "newly initialised", "model.mode=full", "cache"),
    ),
    Case(
        "unknown_name_in_list",
        "a multi-label row whose label list names an unknown label",
        unknown_name_in_list,
        ("validation", "row 4", "'glee'", "labels.json"),
    ),
    Case(
        "empty_label_list",
        "an empty label list (`[]`) without `data.allow_empty_labels=true`",
        empty_label_list,
        ("train", "row 7", "empty label list", "data.allow_empty_labels=true"),
    ),
    Case(
        "mixed_label_rows",
        "label lists mixed with plain labels in one split",
        mixed_label_rows,
        ("train", "row 3", "plain label", "list"),
    ),
    Case(
        "class_balanced_multilabel",
        "`data.class_balanced=true` on multi-label data",
        class_balanced_multilabel,
        ("data.class_balanced", "multi-label", "train.class_weights=balanced"),
    ),
    Case(
        "calibrated_teacher_without_temperature",
        "`distill.calibrated_teacher=true` with a teacher that has no fitted temperature",
        calibrated_teacher_without_temperature,
        ("distill.calibrated_teacher=true", "eval.calibrate=true"),
    ),
    Case(
        "calibration_for_other_labels",
        "`predict` on a model whose `calibration.json` (temperature, thresholds) is for other labels",
        calibration_for_other_labels,
        ("calibration.json", "['neg', 'happy']", "['neg', 'pos']", "delete it"),
        cli="predict",
    ),
    Case(
        "top_k_on_single_label",
        "`predict --top-k` (or `--threshold`) on a single-label model",
        top_k_on_single_label,
        ("--top-k", "multi-label", "single-label"),
        cli="predict",
    ),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.name for c in BAD_INPUTS])
def test_bad_input_gives_one_line_error(case: Case, tiny_bert: Path, toy_data: Path, tmp_path: Path, capsys):
    argv = case.build(tiny_bert, toy_data, tmp_path)
    if case.cli == "predict":
        capsys.readouterr()
        code, err = predict.main(argv), capsys.readouterr().err
    else:
        code, err = run_train(argv, capsys)
    assert_one_line_error(code, err, *case.expect)
    assert_no_finished_run(tmp_path / "out")


# --- cases that need a run first --------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_bert: Path, toy_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    assert (
        train.main(
            [
                "--config",
                "quickstart",
                *tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2, "eval.every": 2}),
            ]
        )
        == 0
    )
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_from_another_config_is_refused(finished_run: Path, tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    argv = [
        "--config",
        "quickstart",
        *tiny_overrides(tiny_bert, toy_data, out, **{"lora.r": 4, "resume": "auto"}),
    ]
    code, err = run_train(argv, capsys)
    assert_one_line_error(code, err, "another config", "lora.r")
    assert snapshot(out) == before, "a refused resume changed the run it refused"


@pytest.mark.parametrize(
    "change",
    [{"train.batch_size": 16}, {"train.grad_accum": 2}, {"seed": 7}, {"data.max_train_samples": 50}],
    ids=["batch_size", "grad_accum", "seed", "data_subset"],
)
def test_resume_with_another_batch_size_seed_or_data_subset_is_refused(
    change: dict, finished_run: Path, tiny_bert, toy_data, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    overrides = {"train.max_steps": 2, "eval.every": 2, "resume": "auto", **change}
    code, err = run_train(
        ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **overrides)], capsys
    )
    assert_one_line_error(code, err, "another config", next(iter(change)), "number of processes")
    assert snapshot(out) == before


def test_existing_run_without_resume_is_refused(finished_run: Path, tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    before = snapshot(out)
    code, err = run_train(["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out)], capsys)
    assert_one_line_error(code, err, "already holds a run", "resume=auto", "overwrite=true")
    assert snapshot(out) == before


def test_docs_table_lists_every_case():
    """Every case has a row, and the message the row shows holds every fragment the test checks."""
    doc = (ROOT / "docs" / "reliability.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in doc.splitlines() if line.startswith("| ")}
    for case in BAD_INPUTS:
        assert case.input in rows, f"docs/reliability.md (Bad input) misses the bad input {case.input!r}"
        missing = [fragment for fragment in case.expect if fragment not in rows[case.input]]
        assert not missing, f"docs/reliability.md: the message for {case.input!r} lacks {missing}"


def test_an_error_line_reaches_stderr_in_one_write(monkeypatch):
    """Two ranks share one stderr: a line written as text and newline separately (what `print` does on a
    write-through stderr) interleaved with the other rank's line in CI. The wrapper writes each line whole."""
    import io
    import sys

    from scalelora.errors import UserError, exit_on_user_error

    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr(sys, "stderr", Recorder())

    def fails(argv):
        raise UserError("a bad setting; fix it")

    assert exit_on_user_error(fails)([]) == 2
    assert writes == ["scalelora: error: a bad setting; fix it\n"]
