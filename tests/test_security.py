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
from scalelora import export, predict, signing, train
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
    # re-signed with this user's key, so the manifest and signature checks pass and only loading with
    # weights_only keeps the pickle from running (an unsigned manifest: the test after this one)
    ckpt.write_manifest(newest)
    args = tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2, "resume": str(newest)})
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    # refused by the load (weights_only, safe_load.py), not by the signature
    assert f"refused to load {newest / 'optimizer.bin'}" in line and "does not unpickle" in line, line
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


def newest_copy(finished: Path, out: Path) -> Path:
    shutil.copytree(finished, out)
    return ckpt.checkpoint_dirs(out / "checkpoints")[-1]


def test_a_symlink_in_a_checkpoint_is_refused_naming_it(finished, tiny_bert, toy_data, tmp_path, capsys):
    """A listed name that is a symlink reads bytes from anywhere, even with the same content."""
    out = tmp_path / "out"
    newest = newest_copy(finished, out)
    victim = newest / "optimizer.bin"
    victim.rename(tmp_path / "elsewhere.bin")
    victim.symlink_to(tmp_path / "elsewhere.bin")
    args = tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2, "resume": "auto"})
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{victim}, which is a symlink" in line, line


def test_a_file_added_while_a_checkpoint_is_saved_is_not_signed(
    tiny_bert, toy_data, tmp_path, monkeypatch, capsys
):
    """The engines write into a private (0700) folder, and the manifest signs the hashes taken as soon as
    they returned: a file that appears in the folder later (here while the trainer state is written,
    just before the manifest) is not signed, and the resume refuses it by name."""
    import stat

    import accelerate

    modes, planted = [], []
    real_save_state = accelerate.Accelerator.save_state
    real_write_json = ckpt.atomic_write_json

    def save_state(self, output_dir=None, **kwargs):
        modes.append(stat.S_IMODE(os.stat(output_dir).st_mode))
        return real_save_state(self, output_dir, **kwargs)

    def write_json(path, data):
        if path.name == ckpt.TRAINER_STATE and path.parent.name.startswith(".tmp-step-"):
            planted.append(path.parent.name.replace(".tmp-", "") + "/random_states_1.pkl")
            write_evil_pickle(path.parent / "random_states_1.pkl", tmp_path / "pwned")
        return real_write_json(path, data)

    out = tmp_path / "out"
    args = tiny_overrides(
        tiny_bert, toy_data, out, **{"train.max_steps": 2, "eval.every": 2, "checkpoint.every": 1}
    )
    with monkeypatch.context() as patched:
        patched.setattr(accelerate.Accelerator, "save_state", save_state)
        patched.setattr(ckpt, "atomic_write_json", write_json)
        assert train.main(["--config", "quickstart", *args]) == 0
    assert modes and all(mode == 0o700 for mode in modes), [oct(m) for m in modes]
    newest = ckpt.checkpoint_dirs(out / "checkpoints")[-1]
    assert stat.S_IMODE(newest.stat().st_mode) == 0o700
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *args, "resume=auto"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{out / 'checkpoints' / planted[-1]}, which its manifest does not list" in line, line
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_folder_replaced_while_saving_is_not_signed(
    tiny_bert, toy_data, tmp_path, monkeypatch, capsys
):
    import accelerate

    real_save_state = accelerate.Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        result = real_save_state(self, output_dir, **kwargs)
        shutil.copytree(output_dir, f"{output_dir}.theirs")  # a look-alike, swapped in by rename
        shutil.rmtree(output_dir)
        os.rename(f"{output_dir}.theirs", output_dir)
        return result

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state)
    out = tmp_path / "out"
    args = tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 1, "eval.every": 1})
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ".tmp-step-1 was replaced, or opened to other users, while the checkpoint was written" in line, (
        line
    )
    assert not ckpt.checkpoint_dirs(out / "checkpoints")


def test_a_file_swapped_after_verification_is_refused_as_it_is_loaded(
    finished, tiny_bert, toy_data, tmp_path, monkeypatch, capsys
):
    """Each file is checked against the manifest as it is opened for loading, not only when the
    checkpoint was chosen: a valid but different optimizer state swapped in between is refused."""
    import accelerate

    out = tmp_path / "out"
    newest = newest_copy(finished, out)
    victim = newest / "optimizer.bin"
    real_load_state = accelerate.Accelerator.load_state

    def load_state(self, *args, **kwargs):
        state = torch.load(victim, weights_only=True)
        state["param_groups"][0]["lr"] = 123.0
        torch.save(state, victim)
        return real_load_state(self, *args, **kwargs)

    monkeypatch.setattr(accelerate.Accelerator, "load_state", load_state)
    args = tiny_overrides(tiny_bert, toy_data, out, **{"train.max_steps": 2, "resume": str(newest)})
    capsys.readouterr()
    assert train.main(["--config", "quickstart", *args]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{victim} does not match its checksum" in line, line


def test_predict_and_export_never_call_an_unsafe_torch_load(finished, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def guarded(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        assert kwargs.get("weights_only") is not False, f"torch.load(weights_only=False) of {args[:1]}"
        return real_load(*args, **kwargs)

    from safetensors.torch import load_file

    pickled = tmp_path / "pickled-adapter"  # --allow-pickle loads it with torch.load: weights_only still
    shutil.copytree(finished / "adapter", pickled)
    torch.save(load_file(str(pickled / "adapter_model.safetensors")), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    monkeypatch.setattr(torch, "load", guarded)
    assert predict.main(["--adapter", str(finished / "adapter"), "--text", "a fine film"]) == 0
    assert predict.main(["--adapter", str(pickled), "--text", "a fine film", "--allow-pickle"]) == 0
    assert calls, "the pickled adapter was not loaded with torch.load"
    assert (
        export.main(["--adapter", str(finished / "adapter"), "--merge", "--out", str(tmp_path / "merged")])
        == 0
    )
    assert predict.main(["--adapter", str(tmp_path / "merged"), "--text", "a fine film"]) == 0
    assert False not in calls


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
