"""Nothing is let in: no pickle code runs, no remote code runs unless asked, no secret is written,
no path from a config or the data writes outside output_dir."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides, write_jsonl, write_toy_dataset
from fault_inject import run_forked
from scalelora import checkpoint as ckpt
from scalelora import predict, signing, train
from scalelora.config import ModelConfig

FAKE_SECRETS = {
    "WANDB_API_KEY": "wandb-fake-0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_FakeTokenForScaleloraSecurityTest0123456789",
    "HUGGING_FACE_HUB_TOKEN": "hf_FakeHubTokenForScaleloraSecurityTest987654",
}


def one_error_line(text: str) -> str:
    lines = [line for line in re.split(r"[\r\n]", text) if line.startswith("scalelora: error:")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


class RunsCode:
    """A pickle payload that, when unpickled, creates `marker`: proof that loading ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def write_evil_pickle(path: Path, marker: Path) -> None:
    with path.open("wb") as handle:
        pickle.dump({"state": RunsCode(marker)}, handle)


@pytest.fixture(scope="module")
def finished(tiny_bert: Path, toy_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "out"
    args = tiny_overrides(
        tiny_bert, toy_data, out, **{"train.max_steps": 2, "eval.every": 2, "checkpoint.every": 1}
    )
    assert train.main(["--config", "quickstart", *args]) == 0
    return out


# --- pickle ------------------------------------------------------------------------------------------


def test_resume_loads_every_torch_file_with_weights_only(
    finished, tiny_bert, toy_data, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    args = tiny_overrides(
        tiny_bert, toy_data, out, **{"train.max_steps": 2, "eval.every": 2, "resume": "auto"}
    )
    assert train.main(["--config", "quickstart", *args]) == 0
    assert calls and all(flag is True for flag in calls), calls
    newest = ckpt.checkpoint_dirs(out / "checkpoints")[-1]
    assert not list(newest.glob("custom_checkpoint_*.pkl")), (
        "a checkpoint file that only full pickle can load"
    )
    assert list(newest.glob("*.safetensors")), "checkpoint weights are not safetensors"


def test_a_checkpoint_with_a_code_running_pickle_is_refused_without_running_it(
    finished, tiny_bert, toy_data, tmp_path, capsys
):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    newest = ckpt.checkpoint_dirs(out / "checkpoints")[-1]
    marker = tmp_path / "pwned"
    write_evil_pickle(newest / "optimizer.bin", marker)
    ckpt.write_manifest(newest)  # an attacker can rewrite the manifest too
    args = tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2, "resume": str(newest)})
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(newest) in line
    assert not marker.exists(), "loading the checkpoint ran code from a pickle"


def test_a_checkpoint_this_user_did_not_sign_is_refused_unless_trusted(
    finished, tiny_bert, toy_data, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    newest = ckpt.checkpoint_dirs(out / "checkpoints")[-1]
    with monkeypatch.context() as attacker:  # files and manifest rewritten by someone without the key
        attacker.setenv(signing.KEY_ENV, str(tmp_path / "attacker.key"))
        ckpt.write_manifest(newest)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = tiny_overrides(
        tiny_bert, toy_data, out, **{"train.max_steps": 2, "eval.every": 2, "resume": "auto"}
    )
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(newest) in line and "checkpoint.trust_unsigned=true" in line, line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, (
        "a refused resume changed the run"
    )
    assert train.main(["--config", "quickstart", *args, "checkpoint.trust_unsigned=true"]) == 0


def test_a_pickle_only_checkpoint_is_refused(finished, tiny_bert, toy_data, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    newest = ckpt.checkpoint_dirs(out / "checkpoints")[-1]
    weights = newest / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), newest / "pytorch_model.bin")
    weights.unlink()
    ckpt.write_manifest(newest)
    args = tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2, "resume": str(newest)})
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "pickle" in line and "safetensors" in line, line


def test_predict_refuses_a_pickle_only_adapter_without_allow_pickle(finished, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished / "adapter", adapter)
    marker = tmp_path / "pwned"
    (adapter / "adapter_model.safetensors").unlink()
    write_evil_pickle(adapter / "adapter_model.bin", marker)
    capsys.readouterr()
    assert predict.main(["--adapter", str(adapter), "--text", "a fine film"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--allow-pickle" in line and "safetensors" in line, line
    assert not marker.exists()


def pickle_only_copy(model: Path, target: Path) -> Path:
    """`model` with its weights as a (harmless) pickle `pytorch_model.bin` and no safetensors file."""
    from safetensors.torch import load_file

    shutil.copytree(model, target)
    torch.save(load_file(str(target / "model.safetensors")), target / "pytorch_model.bin")
    (target / "model.safetensors").unlink()
    return target


def test_a_pickle_only_base_model_loads_only_with_model_allow_pickle(tiny_bert, toy_data, tmp_path, capsys):
    base = pickle_only_copy(tiny_bert, tmp_path / "pickle-base")
    args = [
        "--config",
        "quickstart",
        *tiny_overrides(base, toy_data, tmp_path / "out", **{"train.max_steps": 1}),
    ]
    capsys.readouterr()
    assert train.main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "pickle" in line and "model.allow_pickle=true" in line, line
    assert train.main([*args, "model.allow_pickle=true", "overwrite=true"]) == 0


def test_predict_checks_the_weights_file_it_loads_not_any_safetensors_file(finished, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished / "adapter", adapter)
    marker = tmp_path / "pwned"
    (adapter / "adapter_model.safetensors").rename(
        adapter / "notes.safetensors"
    )  # a stray file proves nothing
    write_evil_pickle(adapter / "adapter_model.bin", marker)
    capsys.readouterr()
    assert predict.main(["--adapter", str(adapter), "--text", "a fine film"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "adapter_model.safetensors" in line and "--allow-pickle" in line, line
    assert not marker.exists()


def test_predict_refuses_an_adapter_whose_base_is_pickle_only(finished, tiny_bert, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    shutil.copytree(finished / "adapter", adapter)
    base = pickle_only_copy(tiny_bert, tmp_path / "pickle-base")
    meta = json.loads((adapter / "scalelora.json").read_text())
    (adapter / "scalelora.json").write_text(json.dumps({**meta, "model_name": str(base)}))
    capsys.readouterr()
    assert predict.main(["--adapter", str(adapter), "--text", "a fine film"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(base) in line and "--allow-pickle" in line, line
    assert predict.main(["--adapter", str(adapter), "--text", "a fine film", "--allow-pickle"]) == 0


# --- trust_remote_code ------------------------------------------------------------------------------------


def test_trust_remote_code_is_off_by_default_and_remote_code_never_runs(
    tiny_bert, toy_data, tmp_path, capsys
):
    assert ModelConfig().trust_remote_code is False
    model = tmp_path / "custom-code-model"
    shutil.copytree(tiny_bert, model)
    marker = tmp_path / "pwned"
    (model / "evil.py").write_text(
        f"import os\nos.makedirs({str(marker)!r}, exist_ok=True)\n"
        "from transformers import BertConfig, BertForSequenceClassification\n"
        "class EvilConfig(BertConfig):\n    model_type = 'evil'\n"
        "class EvilModel(BertForSequenceClassification):\n    config_class = EvilConfig\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "evil.EvilConfig",
        "AutoModelForSequenceClassification": "evil.EvilModel",
    }
    config["model_type"] = "evil"
    (model / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *tiny_overrides(model, toy_data, out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "model.trust_remote_code=true" in line, line
    assert not marker.exists(), "the model's own Python code ran without trust_remote_code"


# --- secrets ------------------------------------------------------------------------------------------


def test_no_secret_is_printed_logged_or_written(tiny_bert, toy_data, tmp_path, monkeypatch):
    for name, value in FAKE_SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out, log = tmp_path / "out", tmp_path / "log"
    settings = {
        "tracking.report_to": "wandb",
        "tracking.wandb.mode": "offline",  # writes its run files into output_dir without a network
        "checkpoint.every": 2,
    }
    code = run_forked(
        ["--config", "quickstart", *tiny_overrides(tiny_bert, toy_data, out, **settings)], log=str(log)
    )
    assert code == 0, log.read_text()[-3000:]
    written = [p for p in out.rglob("*") if p.is_file()] + [log]
    assert any("wandb" in str(p) for p in written), "the W&B run wrote nothing: the test would prove little"
    for path in written:
        data = path.read_bytes()
        for name, value in FAKE_SECRETS.items():
            assert value.encode() not in data, f"{name} leaked into {path}"


# --- paths from configs and data --------------------------------------------------------------------------


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_labels_and_names_with_dot_dot_write_nothing_outside_output_dir(tiny_bert, tmp_path):
    evil_labels = ["../../escaped", "../..", "a/b\\c"]
    data = write_toy_dataset(tmp_path / "data", labels_json=False)
    for split in ("train", "validation", "test"):
        path = data / f"{split}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        write_jsonl(path, [{"text": r["text"], "label": evil_labels[i % 3]} for i, r in enumerate(rows)])
    sandbox = tmp_path / "sandbox"
    out = sandbox / "runs" / "out"
    out.mkdir(parents=True)
    before = files_under(tmp_path)
    settings = {"tracking.wandb.name": "../../escaped-run", "tracking.wandb.group": "../../g"}
    code = run_forked(
        ["--config", "quickstart", *tiny_overrides(tiny_bert, data, out, **settings)],
        log=str(sandbox / "log"),
    )
    assert code == 0, (sandbox / "log").read_text()[-3000:]
    new = files_under(tmp_path) - before - {sandbox / "log"}
    outside = sorted(str(p) for p in new if out not in p.parents)
    assert not outside, f"files written outside output_dir: {outside}"
    assert json.loads((out / "adapter" / "labels.json").read_text()) == sorted(evil_labels)


def test_a_recipe_name_cannot_place_the_default_output_dir_elsewhere(capsys):
    assert train.main(["--config", "quickstart", "recipe=../../escaped"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "recipe" in line
