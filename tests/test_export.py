"""`python -m scalelora.export --merge`: a plain transformers model that predicts as the adapter did."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from scalelora.export import main as export_main

TEXTS = ["the film was superb and moving", "a dull , tedious plot", "the acting", "really quite awful ending"]


@pytest.fixture(scope="module")
def trained_adapter(finished_tiny_run):
    return finished_tiny_run / "adapter"


def logits(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    with torch.inference_mode():
        encoded = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return model(**encoded).logits.float()


def test_merged_model_loads_alone_and_matches_the_adapter(trained_adapter, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scalelora.predict import load_for_inference

    out = tmp_path / "merged"
    done = run_cli("scalelora.export", ["--adapter", str(trained_adapter), "--merge", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "max |logit difference|" in done.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()  # nothing PEFT left

    merged = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    labels = json.loads((trained_adapter / "labels.json").read_text())
    assert [merged.config.id2label[i] for i in range(len(labels))] == labels

    assert merged.config.problem_type == "single_label_classification"

    adapter_model, adapter_tokenizer, _, _ = load_for_inference(trained_adapter)
    expected = logits(adapter_model, adapter_tokenizer, TEXTS)
    got = logits(merged, tokenizer, TEXTS)
    # the run calibrated the adapter (eval.calibrate defaults to true): the export divides the head's
    # output layer by the fitted temperature, so the plain model's softmax is the calibrated one
    temperature = json.loads((trained_adapter / "calibration.json").read_text())["temperature"]
    assert temperature != pytest.approx(1.0, abs=1e-3)
    assert "folded into the head" in done.stdout
    torch.testing.assert_close(got, expected / temperature, atol=1e-5, rtol=0)
    saved = json.loads((out / "calibration.json").read_text())
    assert saved["temperature_in_weights"] is True and saved["temperature"] == temperature

    # predict prints the same probabilities from the adapter and from the export (applied once, not twice)
    from scalelora.predict import main as predict_main

    texts = sum((["--text", t] for t in TEXTS), [])
    capsys.readouterr()
    assert predict_main(["--adapter", str(trained_adapter), *texts]) == 0
    from_adapter = capsys.readouterr().out.splitlines()
    assert predict_main(["--adapter", str(out), *texts]) == 0
    from_export = capsys.readouterr().out.splitlines()
    assert len(from_adapter) == len(from_export) == len(TEXTS)
    for a, b in zip(from_adapter, from_export):
        a, b = json.loads(a), json.loads(b)
        assert a["label"] == b["label"] and a["probs"] == pytest.approx(b["probs"], abs=2e-6)
    # the adapter really changed the model: a merge of an untrained (B = 0) LoRA would prove nothing
    with adapter_model.disable_adapter():
        assert not torch.allclose(logits(adapter_model, adapter_tokenizer, TEXTS), expected, atol=1e-4)


def test_export_errors_are_one_line(trained_adapter, tmp_path, capsys):
    assert export_main(["--adapter", str(trained_adapter), "--out", str(tmp_path / "x")]) == 2
    assert "pass --merge" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert export_main(["--adapter", str(trained_adapter), "--merge", "--out", str(busy)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (busy / "keep.txt").read_text() == "mine"
    assert export_main(["--adapter", str(tmp_path / "missing"), "--merge", "--out", str(tmp_path / "y")]) == 2
    assert "no such folder" in capsys.readouterr().err
