"""Config strictness, recipes and accel configs: every shipped file loads and validates."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from scalelora.config import (
    MAPPING_KEYS,
    RunConfig,
    config_keys,
    dotted_get,
    dump_yaml,
    key_info,
    load_config,
    parse_overrides,
    recipe_descriptions,
    recipe_names,
    to_dict,
)
from scalelora.errors import ConfigError
from scalelora.train import main

ROOT = Path(__file__).resolve().parents[1]
EXPECTED_RECIPES = {
    "quickstart",
    "rotten_tomatoes",
    "emotion",
    "sst2",
    "codemix_tamil",
    "codemix_hindi",
    "imdb",
    "gpt2_emotion",
    "distilroberta_emotion",
    "distilbert_rotten_tomatoes",
}


def test_every_expected_recipe_ships_with_a_description():
    assert set(recipe_names()) >= EXPECTED_RECIPES
    assert all(recipe_descriptions()[name] for name in recipe_names())


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_loads_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    assert cfg.recipe == name
    assert cfg.run_dir == Path(f"runs/{name}")


def test_precision_is_auto_by_default_and_the_results_recipes_keep_fp32():
    """The committed results were trained in fp32: the recipes the results study trains pin it, so
    `auto` choosing bf16 on another host never retrains them differently (their resolved configs, which
    the results' stamps hash, are what they were)."""
    from studies.results import DATASETS, recipe_of

    assert RunConfig().train.precision == "auto" and key_info("train.precision").before == "no"
    results_recipes = {recipe_of(dataset) for dataset in DATASETS}
    assert "goemotions" in results_recipes  # a shipped recipe the study trains as it is
    for name in recipe_names():
        expected = "no" if name in results_recipes or name.startswith("results_") else "auto"
        assert load_config(name).train.precision == expected, name
        if expected == "no":  # explicit, not YAML's false that happens to read as it
            text = resources.files("scalelora.recipes").joinpath(f"{name}.yaml").read_text()
            assert "  precision: 'no'\n" in text, name


def test_a_half_precision_base_is_valid_with_auto_precision():
    from scalelora.runtime import choose_precision

    for dtype, precision in (("bfloat16", "bf16"), ("float16", "fp16")):
        cfg = load_config("quickstart", [f"model.dtype={dtype}"])  # auto: no conflict to refuse
        assert choose_precision(cfg.train.precision, cfg.model.dtype).precision == precision
    with pytest.raises(ConfigError, match="model.dtype=bfloat16 needs train.precision=bf16"):
        load_config("quickstart", ["model.dtype=bfloat16", "train.precision=no"])


@pytest.mark.parametrize("path", sorted((ROOT / "accel_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accel_config_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1
    assert config.compute_environment.value == "LOCAL_MACHINE"


def test_unknown_key_names_the_key_and_closest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'lora\.rank'; did you mean 'lora\.r'"):
        load_config("quickstart", ["lora.rank=4"])
    with pytest.raises(ConfigError, match=r"'train\.learning_rate'; did you mean 'train\.lr'"):
        load_config("quickstart", ["train.learning_rate=1e-3"])


def test_distill_alpha_points_to_distill_weight_and_lora_alpha_stays_a_key():
    """alpha is the literature's name for the distillation weight; the nearest spelling was distill.teacher."""
    with pytest.raises(ConfigError, match=r"'distill\.alpha'; did you mean 'distill\.weight'"):
        load_config("quickstart", ["distill.alpha=0.3"])
    assert load_config("quickstart", ["lora.alpha=8"]).lora.alpha == 8.0
    with pytest.raises(ConfigError, match=r"'lora\.lora_alpha'; did you mean 'lora\.alpha'"):
        load_config("quickstart", ["lora.lora_alpha=8"])


def test_config_keys_are_every_field_of_every_section():
    """config_keys() against the tree to_dict writes: a mapping is a section unless it is a key's value."""

    def leaves(node: dict, prefix: str) -> list[str]:
        keys = []
        for name, value in node.items():
            dotted = f"{prefix}{name}"
            is_section = isinstance(value, dict) and dotted not in MAPPING_KEYS
            keys += leaves(value, f"{dotted}.") if is_section else [dotted]
        return keys

    keys = config_keys()
    assert keys == leaves(to_dict(RunConfig()), "")
    assert "tracking.wandb.project" in keys and "pipeline" in keys and "explicit_keys" not in keys
    for key in keys:  # each resolves on a config and on its dict, to the same value
        assert dotted_get(RunConfig(), key) == dotted_get(to_dict(RunConfig()), key) == key_info(key).default


def test_explicit_keys_is_not_a_config_key(tmp_path, capsys):
    """The keys the command line set: kept on the config, never written out, never settable."""
    cfg = load_config("quickstart", ["lora.r=4", "train.lr=1e-3"])
    assert cfg.explicit_keys == {"lora.r", "train.lr"}
    assert "explicit_keys" not in to_dict(cfg) and "explicit_keys" not in dump_yaml(cfg)
    with pytest.raises(ConfigError, match=r"unknown config key 'explicit_keys'"):
        load_config("quickstart", ["explicit_keys=[lora.r]"])
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"explicit_keys": ["lora.r"]}))
    with pytest.raises(ConfigError, match=r"unknown config key 'explicit_keys'"):
        load_config(str(path))
    assert main(["--config", "quickstart", "--print-config", "lora.r=4"]) == 0
    assert "explicit_keys" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.r=four", r"lora\.r: expected an integer"),
        ("train.lr=fast", r"train\.lr: expected a number"),
        ("train.precision=fp8", r"train\.precision: 'fp8' is not one of auto, no, fp16, bf16"),
        ("train.precision=yes", r"train\.precision: .yes. is not one of auto, no, fp16, bf16"),
        ("model.mode=qlora", r"model\.mode: 'qlora' is not one of lora, full, head_only"),
        ("train.batch_size=0", r"train\.batch_size must be positive"),
        ("lora.dropout=1.5", r"lora\.dropout must be in \[0, 1\)"),
        ("data.keep_labels=[only]", r"data\.keep_labels must name at least 2 labels"),
        ("eval.every=-5", r"eval\.every must be positive"),
        ("model.trust_remote_code=yes please", r"model\.trust_remote_code: expected true or false"),
        ("lora=3", r"lora must be a mapping"),
        ("train", r"not of the form dotted\.key=value"),
    ],
)
def test_wrong_values_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("quickstart", [override])


def test_cross_section_conflicts_are_collected_and_raised_once():
    with pytest.raises(ConfigError) as info:
        load_config("quickstart", ["model.load_in_8bit=true", "model.load_in_4bit=true", "model.mode=full"])
    text = str(info.value)
    assert "exclusive" in text and "model.mode=full cannot train a quantized base" in text


def test_overrides_parse_yaml_values_and_comma_lists():
    cfg = load_config(
        "quickstart",
        [
            "lora.target_modules=query,value",
            "data.keep_labels=[neg, pos]",
            "train.lr=3e-4",
            "train.max_steps=7",
            "resume=null",
        ],
    )
    assert cfg.lora.target_modules == ["query", "value"]
    assert cfg.data.keep_labels == ["neg", "pos"]
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.max_steps == 7 and cfg.resume is None
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


def test_a_yaml_file_works_as_config(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "emotion"}, "lora": {"r": 4}}))
    cfg = load_config(str(path))
    assert cfg.recipe == "mine" and cfg.lora.r == 4 and cfg.data.path == "emotion"


def test_recipe_not_found_suggests_a_name(capsys):
    assert main(["--config", "quikstart"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "scalelora: error: --config quikstart: no such recipe or file (did you mean 'quickstart'?); "
        "`python -m scalelora.train --list` shows the recipes"
    ]


def test_cli_list_and_print_config(capsys):
    assert main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in EXPECTED_RECIPES)
    assert main(["--config", "quickstart", "--print-config", "lora.r=4"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lora"]["r"] == 4 and printed["model"]["name"] == "minilm-l6"


def test_cli_error_is_one_line_with_exit_code_2(capsys):
    assert main(["--config", "quickstart", "lora.rnk=2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scalelora: error: unknown config key 'lora.rnk'")
    assert "Traceback" not in err
