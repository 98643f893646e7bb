"""benchmarks/data_scale.py works: its seeded data generator, its dry run of every measurement on 2,000
rows with a tiny model (the large N are the benchmark's, run by hand: benchmarks/README.md), the figure.
No timing is asserted: they depend on the machine."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import data_scale


def read(folder: Path, split: str) -> list[dict]:
    return [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]


def test_the_generated_rows_are_seeded_short_and_long_with_2_or_500_classes(tmp_path):
    short = data_scale.generate(tmp_path / "short", 3_000, "short-2", validation_rows=100)
    mixed = data_scale.generate(tmp_path / "mixed", 3_000, "mixed-500", validation_rows=100)
    again = data_scale.generate(tmp_path / "again", 3_000, "mixed-500", validation_rows=100)
    assert (tmp_path / "mixed" / "train.jsonl").read_bytes() == (
        tmp_path / "again" / "train.jsonl"
    ).read_bytes()
    assert short["rows"] == mixed["rows"] == again["rows"] == 3_000
    rows = {name: read(tmp_path / name, "train") for name in ("short", "mixed")}
    assert len(rows["short"]) == 3_000 and len(read(tmp_path / "mixed", "validation")) == 100
    assert {r["label"] for r in rows["short"]} == {"neg", "pos"}
    names = json.loads((tmp_path / "mixed" / "labels.json").read_text())
    assert len(names) == 500 and {r["label"] for r in rows["mixed"]} <= set(names)
    counts = np.unique([r["label"] for r in rows["mixed"]], return_counts=True)[1]
    assert counts.max() > 50 * counts.min()  # a long tail
    words = {name: np.array([len(r["text"].split()) for r in rows[name]]) for name in rows}
    assert words["short"].max() <= data_scale.SHORT_WORDS[1]
    long = words["mixed"] == data_scale.LONG_WORDS
    assert 0.003 < long.mean() < 0.03  # about 1% of texts of ~2,000 tokens


@pytest.mark.slow
def test_a_dry_run_measures_every_side_and_writes_the_json_and_figure(tiny_bert, tmp_path):
    out, png = tmp_path / "data-scale.json", tmp_path / "data-scale.png"
    args = ["--dry-run", "--variants", "mixed-500", "--model", str(tiny_bert), "--out", str(out)]
    assert data_scale.main([*args, "--png", str(png), "--workdir", str(tmp_path / "work")]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["model"] == str(tiny_bert)
    env = report["environment"]
    assert (
        env["date"] and env["machine"]["cores"] and env["versions"]["datasets"] and "load_average_end" in env
    )
    result = report["results"][str(data_scale.DRY_RUN_ROWS)]["mixed-500"]
    ours = result["scalelora"]
    assert result["data"]["rows"] == data_scale.DRY_RUN_ROWS and ours["data_where"] == "in memory"
    assert 0 < ours["first_line_seconds"] <= ours["first_data_line_seconds"] <= ours["first_step_seconds"]
    assert ours["peak_rss_bytes_at_first_step"] > 0 and ours["truncated"]["train"]["rows"] > 0
    assert any("tokenize train" in text for _, text in ours["data_lines"])
    assert result["scalelora_cached"] is None  # 2,000 rows are held in memory: no disk cache to reuse
    assert result["peer"]["rows"] == data_scale.DRY_RUN_ROWS and result["peer"]["load_tokenize_seconds"] > 0
    two = result["two_processes"]
    assert [r["rank"] for r in two["ranks"]] == [0, 1] and two["second_to_first_data_memory"] is not None
    assert set(result["ratios"]) >= {"first_step_over_peer_load_tokenize", "second_to_first_data_memory"}
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 0
    assert not (tmp_path / "work" / "mixed-500-2000").exists()  # the generated rows do not pile up


def test_a_dry_run_refuses_large_n():
    with pytest.raises(SystemExit):
        data_scale.main(["--dry-run", "--rows", "100000"])
