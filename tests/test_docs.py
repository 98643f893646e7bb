"""The documentation's links: every relative link in README.md and docs/ points to a file of the
repository (and, with `#anchor`, to a heading of that page), and every page in docs/ is reachable
from the README; every key of config.py is documented; every number the README and docs/ take from a
committed JSON is that JSON's."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"(`+).+?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
CODE_PAGE_PATH = re.compile(r"`(\.{1,2}/[^`\s]+\.md)`")  # a page named as a relative path in code


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where links are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link markup reduced to its text, lower case, every character
    but letters, marks, digits, `_`, `-` and spaces dropped, spaces turned into `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(page: Path) -> list[str]:
    return [t for t in LINK.findall(prose(page.read_text())) if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def resolve(page: Path, target: str) -> tuple[Path, str]:
    path, _, anchor = target.partition("#")
    return ((page.parent / path).resolve() if path else page), anchor


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Teacher → LoRA student with distillation", "teacher--lora-student-with-distillation"),
        (
            "Scale out: DeepSpeed ZeRO, 8-bit/4-bit bases, SLURM and preemption",
            "scale-out-deepspeed-zero-8-bit4-bit-bases-slurm-and-preemption",
        ),
        ("Distillation (`distill.*`)", "distillation-distill"),
        ("`make results`", "make-results"),
    ],
)
def test_slug_matches_github(heading, anchor):
    assert slug(heading) == anchor


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, anchor = resolve(page, target)
        if not path.exists() or not path.is_relative_to(ROOT):
            broken.append(f"{target}: no such file in the repository")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_named_by_relative_path_are_in_the_repository(page):
    """A page named in code (`../x/Y.md`) rather than linked is still one a fresh clone has (the README
    once pointed at `../shared/ARCHITECTURE.md`, beside the checkout, where no clone has it)."""
    outside = []
    for target in CODE_PAGE_PATH.findall(FENCE.sub("", page.read_text())):
        path = (page.parent / target).resolve()
        if not path.is_file() or not path.is_relative_to(ROOT):
            outside.append(target)
    assert not outside, f"{page.relative_to(ROOT)} names pages outside the repository: {outside}"


def test_every_commit_a_page_cites_is_in_the_repository():
    """A 7-40 character hex word with a digit in README.md, docs/ or results/*.md is a commit, and
    `git cat-file -e` finds it (performance.md once cited a hash a rebase had replaced). Write other long
    numbers with thousands separators."""
    import subprocess

    git = ["git", "-C", str(ROOT)]
    shallow = subprocess.run([*git, "rev-parse", "--is-shallow-repository"], capture_output=True, text=True)
    if shallow.returncode != 0 or shallow.stdout.strip() != "false":
        pytest.skip("needs a git checkout with its whole history")
    missing = []
    for page in [*PAGES, *sorted((ROOT / "results").glob("*.md"))]:
        for word in sorted(set(re.findall(r"\b[0-9a-f]{7,40}\b", page.read_text()))):
            found = subprocess.run([*git, "cat-file", "-e", f"{word}^{{commit}}"], capture_output=True)
            if any(c.isdigit() for c in word) and found.returncode != 0:
                missing.append(f"{page.relative_to(ROOT)}: {word}")
    assert not missing, f"commits cited but not in the repository: {missing}"


def test_every_docs_page_is_reachable_from_the_readme():
    reached, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in reached:
            continue
        reached.add(page)
        for target in relative_links(page):
            path, _ = resolve(page, target)
            if path.suffix == ".md" and path.is_file():
                todo.append(path)
    orphans = [str(p.relative_to(ROOT)) for p in PAGES if p not in reached]
    assert not orphans, f"pages no link leads to from README.md: {orphans}"


def test_every_config_key_is_documented():
    """Each key of config.py is named in the docs: as `section.key` anywhere, or as `key` in its
    section's row of the README's configuration table (`top` for the top-level keys)."""
    from scalelora.config import config_keys

    readme = (ROOT / "README.md").read_text()
    text = "\n".join(p.read_text() for p in PAGES)
    rows = {}
    for line in readme.splitlines():
        cells = line.split(" | ")
        if line.startswith("| ") and len(cells) == 2:
            rows[cells[0][2:].strip("`")] = cells[1]
    sections = {"top", "data", "model", "lora", "train", "eval", "checkpoint", "tracking", "distill"}
    assert sections <= rows.keys()
    undocumented = []
    for key in config_keys():
        section, _, leaf = key.rpartition(".")
        in_table = f"`{leaf}`" in rows.get(section.split(".")[0] or "top", "")
        if not in_table and not re.search(rf"`{re.escape(key)}(?![\w.])", text):
            undocumented.append(key)
    assert not undocumented, f"config keys no page documents: {undocumented}"


# --- numbers quoted from committed JSON -----------------------------------------------------------
# Every number a page takes from a committed JSON (benchmarks/results/*.json, results/results.json) is
# rebuilt here from that JSON, rounded as printed, and looked up in the page. A number the page gives as
# "before" or "earlier" is read from the file as committed then (skipped outside a git checkout).


def flat(text: str) -> str:
    """Whitespace runs as one space: a quoted phrase may wrap across lines."""
    return " ".join(text.split())


def committed(path: str, commit: str | None = None) -> dict:
    """A committed JSON: as it is now, or as it was at `commit`."""
    import json
    import subprocess

    if commit is None:
        return json.loads((ROOT / path).read_text())
    shown = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"{path} as of {commit} needs a git checkout with that commit")
    return json.loads(shown.stdout)


def benchmark(name: str, commit: str | None = None) -> dict:
    return committed(f"benchmarks/results/{name}.json", commit)


def assert_quoted(page: str, quotes: list[str]) -> None:
    text = flat((ROOT / page).read_text())
    missing = [quote for quote in quotes if flat(quote) not in text]
    assert not missing, f"{page} does not quote the committed JSON as: {missing}"


def mib(size: float) -> str:
    return f"{size / 2**20:.0f}"


def hhmm(report: dict) -> str:
    return report["environment"]["date"][11:16]


def load_range(*reports: dict) -> str:
    """The 1-minute load averages the reports recorded at their start and end, as `low–high`."""
    loads = [r["environment"][k][0] for r in reports for k in ("load_average_start", "load_average_end")]
    return f"{min(loads):.1f}–{max(loads):.1f}"


def test_readme_quotes_the_committed_benchmark_json():
    from scalelora.config import load_config

    ttr, rt = benchmark("cpu-minilm-ttr"), benchmark("cpu-minilm-rt")
    run, counted = ttr["sides"]["scalelora"], rt["sides"]["scalelora"]["repeats"][0]
    assert ttr["command"] == "python -m scalelora.train --config quickstart" and rt["model"] == "minilm-l6"
    trainable, total = counted["trainable_params"], counted["total_params"]
    grouped = rt["sides"][rt["comparator"]]
    assert_quoted(
        "README.md",
        [
            f"torch 2.13 CPU, {ttr['environment']['date'][:10]};",
            f"validation accuracy **{run['validation_accuracy']:.3f}**, test accuracy **{run['test_accuracy']:.3f}**",
            f"after {ttr['epochs']:.0f} epochs ({run['repeats'][0]['optimizer_steps']} optimizer steps of "
            f"{load_config('quickstart').train.batch_size})",
            f"{trainable:,} trainable of {total / 1e6:.1f}M parameters ({100 * trainable / total:.2f}%;",
            f"{run['phase_seconds']['train']:.0f} s of training, {run['wall_seconds']:.0f} s from launch",
            # the performance page in one line
            f"On 2 CPU cores: {rt['ratio']:.2f}x the samples/s of length-grouped HF "
            f"({rt['sides']['scalelora']['achieved_gflops'] / grouped['achieved_gflops']:.2f}x per FLOP), "
            f"{rt['ratio_default']:.2f}x HF's defaults, {100 * rt['mfu_measured_gemm']:.0f}% of measured GEMM, "
            f"{100 * (1 - rt['memory_ratio']):.0f}% less memory; time to result {ttr['ratio']:.2f}x",
        ],
    )


def test_design_page_quotes_the_committed_parameter_count():
    counted = benchmark("cpu-minilm-rt")["sides"]["scalelora"]["repeats"][0]
    trainable, total = counted["trainable_params"], counted["total_params"]
    assert_quoted("docs/design.md", [f"MiniLM-L6: {trainable:,} of {total / 1e6:.1f}M parameters"])


def test_performance_page_quotes_the_committed_benchmark_json():
    """The throughput benchmark: its table, ratios, measured GEMM, where the gain comes from, memory."""
    from benchmarks.plot import throughput_table

    rt, ttr = benchmark("cpu-minilm-rt"), benchmark("cpu-minilm-ttr")
    kd, profile = benchmark("cpu-minilm-kd"), benchmark("levers-profile")
    sides, shapes = rt["sides"], rt["gemm"]["shapes"]
    ours, grouped, hf = sides["scalelora"], sides[rt["comparator"]], sides["hf_trainer"]
    dropout, nogroup = sides["scalelora_torch_dropout"], sides["scalelora_nogroup"]
    versions = rt["environment"]["versions"]
    per_flop = ours["achieved_gflops"] / grouped["achieved_gflops"]

    def gemm(shape: str) -> str:
        return f"{shapes[shape]['gflops']:.1f} ({shapes[shape]['k']}×{shapes[shape]['n']})"

    def minor(package: str) -> str:
        return ".".join(versions[package].split(".")[:2])

    assert rt["comparator"] == "hf_trainer_grouped"
    pairs = list(zip(ours["repeats"], grouped["repeats"]))
    assert all(a["peak_memory_bytes"] < b["peak_memory_bytes"] for a, b in pairs)  # "below HF in all three"
    assert_quoted(
        "docs/performance.md",
        [
            f"torch {minor('torch')} CPU, transformers {minor('transformers')}, peft {minor('peft')}, "
            f"accelerate {minor('accelerate')}**, measured on {rt['environment']['date'][:10]} (`cpu-minilm-rt` "
            f"from {hhmm(rt)} to {hhmm(ttr)} UTC at commit {rt['environment']['git_commit']}",
            f"(load average {load_range(rt, ttr, kd, profile)} during the runs",
            f"`cpu-minilm-rt`, {rt['steps']} timed steps after {rt['warmup']} warm-up steps, {rt['repeats']} "
            f"repeats, {rt['environment']['date'][:10]} {hhmm(rt)}–{hhmm(ttr)} UTC at commit "
            f"{rt['environment']['git_commit']}, load average {load_range(rt)}",
            *throughput_table(rt),
            f"`comparator` = `{rt['comparator']}`; **`ratio` = {rt['ratio']:.3f}** (samples/s), "
            f"`tokens_ratio` = {rt['tokens_ratio']:.3f}; **`ratio_default` = {rt['ratio_default']:.3f}**",
            f"({rt['gemm']['tokens']} rows, the real tokens of a median step): "
            f"{gemm('hidden_x_hidden').replace(' (', ' GFLOP/s (', 1)}, {gemm('hidden_x_ffn')}, "
            f"{gemm('ffn_x_hidden')}, **`gemm_gflops` = {rt['gemm_gflops']:.1f}** for the layer mix; the fused "
            f"Q/K/V shape ({shapes['hidden_x_3hidden']['k']}×{shapes['hidden_x_3hidden']['n']}) "
            f"{shapes['hidden_x_3hidden']['gflops']:.1f}",
            f"**`mfu_measured_gemm` = {100 * rt['mfu_measured_gemm']:.1f}%** for scalelora, "
            f"{100 * grouped['mfu_measured_gemm']:.1f}% for length-grouped HF",
            f"{dropout['step_seconds']:.3f} against {ours['step_seconds']:.3f} s/step, so `train.mask_dropout` "
            f"makes a step **{dropout['step_seconds'] / ours['step_seconds']:.2f}x** faster and, alone, leaves "
            f"scalelora at {rt['ratios']['scalelora_torch_dropout']:.3f}x the comparator",
            f"({grouped['tokens_per_second']:.0f} ÷ {grouped['samples_per_second']:.1f} = "
            f"{grouped['tokens_per_second'] / grouped['samples_per_second']:.1f} real tokens per example)",
            f"({ours['tokens_per_second']:.0f} ÷ {ours['samples_per_second']:.1f} = "
            f"{ours['tokens_per_second'] / ours['samples_per_second']:.1f})",
            f"{ours['achieved_gflops']:.1f} against {grouped['achieved_gflops']:.1f} GFLOP/s of counted LoRA "
            f"FLOPs (**{per_flop:.2f}x**), {100 * ours['mfu_measured_gemm']:.1f}% against "
            f"{100 * grouped['mfu_measured_gemm']:.1f}% of measured GEMM; with torch's dropout scalelora is at "
            f"{dropout['achieved_gflops']:.1f} ({dropout['achieved_gflops'] / grouped['achieved_gflops']:.2f}x)",
            f"scalelora {mib(ours['peak_memory_bytes'])} MiB against {mib(grouped['peak_memory_bytes'])} MiB for "
            f"length-grouped HF at the same settings; **`memory_ratio` = {rt['memory_ratio']:.3f}** (paired "
            "median; repeats "
            + ", ".join(f"{mib(a['peak_memory_bytes'])}/{mib(b['peak_memory_bytes'])}" for a, b in pairs)
            + " MiB: below HF in all three)",
            f"With torch's dropout it is {mib(dropout['peak_memory_bytes'])} MiB: the 1-byte masks save about "
            f"{int(mib(dropout['peak_memory_bytes'])) - int(mib(ours['peak_memory_bytes']))} MiB",
            # the levers measured as sides of this benchmark
            f"scalelora {ours['samples_per_second']:.1f} against {nogroup['samples_per_second']:.1f} samples/s "
            f"without it (`scalelora_nogroup`), padding efficiency {ours['padding_efficiency']:.2f} against "
            f"{nogroup['padding_efficiency']:.2f}",
            f"HF gains the same from `group_by_length` ({grouped['samples_per_second']:.1f} against "
            f"{hf['samples_per_second']:.1f})",
            f"scalelora {ours['samples_per_second']:.1f} against {dropout['samples_per_second']:.1f} samples/s "
            f"with torch's dropout (`scalelora_torch_dropout`), {ours['step_seconds']:.3f} against "
            f"{dropout['step_seconds']:.3f} s/step, **{dropout['step_seconds'] / ours['step_seconds']:.2f}x**; "
            f"peak RSS {mib(ours['peak_memory_bytes'])} against {mib(dropout['peak_memory_bytes'])} MiB",
            f"{shapes['hidden_x_3hidden']['gflops']:.1f} GFLOP/s fused against "
            f"{shapes['hidden_x_hidden']['gflops']:.1f} separate",
        ],
    )


def test_performance_page_quotes_time_to_result_kd_and_the_targets():
    from benchmarks.plot import time_to_result_table

    rt, ttr, kd = benchmark("cpu-minilm-rt"), benchmark("cpu-minilm-ttr"), benchmark("cpu-minilm-kd")
    ours, theirs = ttr["sides"]["scalelora"], ttr["sides"]["hf_trainer_script"]
    grouped = rt["sides"][rt["comparator"]]
    per_flop = rt["sides"]["scalelora"]["achieved_gflops"] / grouped["achieved_gflops"]
    shares = [100 * s["phase_seconds"]["train"] / s["wall_seconds"] for s in (ours, theirs)]
    steps = kd["sides"]
    assert ttr["repeats"] == 1 and kd["kd_cache_step_ratio"] <= 1.05 and kd["kd_self_step_ratio"] <= 1.6
    assert 1.15 <= rt["ratio"] < 1.3 and 100 * rt["mfu_measured_gemm"] >= 55 and ttr["ratio"] < 1.3
    assert_quoted(
        "docs/performance.md",
        [
            f"the full quickstart: {ttr['epochs']:.0f} epochs, {ours['repeats'][0]['optimizer_steps']} optimizer "
            f"steps; 1 run each, {ttr['environment']['date'][:10]} {hhmm(ttr)}–",
            f"UTC at {ttr['environment']['git_commit']}; [`cpu-minilm-ttr.json`]",
            # the table's cells after the side's name (the page names each side's command too)
            *[line.split(" | ", 1)[1] for line in time_to_result_table(ttr)[2:]],
            f"**`ratio` = {ttr['ratio']:.3f}** (HF script wall ÷ scalelora wall). Training is "
            f"{min(shares):.0f}–{max(shares):.0f}% of both",
            f"the training ratio ({theirs['phase_seconds']['train']:.1f} ÷ {ours['phase_seconds']['train']:.1f} = "
            f"{theirs['phase_seconds']['train'] / ours['phase_seconds']['train']:.2f}x) is the per-FLOP gain of the "
            f"{rt['steps']}-step benchmark above ({per_flop:.2f}x), not its {rt['ratio']:.2f}x",
            f"starts up in half the time ({ours['phase_seconds']['startup']:.1f} s against "
            f"{theirs['phase_seconds']['startup']:.1f} s",
            f"({min(shares):.0f}–{max(shares):.0f}% of the wall time on both sides)",
            f"is {ours['phase_seconds']['startup']:.1f} s of {ours['wall_seconds']:.1f}.",
            f"in time to result, {ours['phase_seconds']['eval']:.1f} s for 2 validation passes",
            f"KD (`cpu-minilm-kd`, {kd['steps']} timed steps after {kd['warmup']}, {kd['repeats']} repeats, the "
            f"scalelora sides only, {hhmm(kd)}–",
            f"UTC at {kd['environment']['git_commit']}; [`cpu-minilm-kd.json`]",
            f"plain LoRA {steps['scalelora']['step_seconds']:.3f} s/step, KD from cache "
            f"{steps['scalelora_kd_cache']['step_seconds']:.3f} (**`kd_cache_step_ratio` = "
            f"{kd['kd_cache_step_ratio']:.3f}**",
            f"KD from `self` {steps['scalelora_kd_self']['step_seconds']:.3f} (**`kd_self_step_ratio` = "
            f"{kd['kd_self_step_ratio']:.3f}**",
            # the targets table
            f"| >= 1.15x / 1.3x | {rt['ratio']:.3f}x ({per_flop:.2f}x per counted FLOP) | floor met, aim missed |",
            f"| >= 55% / 65% | {100 * rt['mfu_measured_gemm']:.1f}% (HF grouped "
            f"{100 * grouped['mfu_measured_gemm']:.1f}%) |",
            f"| <= HF | {mib(rt['sides']['scalelora']['peak_memory_bytes'])} vs {mib(grouped['peak_memory_bytes'])} "
            f"MiB, `memory_ratio` {rt['memory_ratio']:.3f} | met |",
            f"| >= 1.3x | {ttr['ratio']:.3f}x (1 run each) | **missed** |",
            f"| <= 1.05 | {kd['kd_cache_step_ratio']:.3f} | met |",
            f"| <= 1.6 | {kd['kd_self_step_ratio']:.3f} | met |",
        ],
    )
    aim = "floor and aim met" if 100 * rt["mfu_measured_gemm"] >= 65 else "floor met, aim missed"
    assert_quoted(
        "docs/performance.md", [f"% (HF grouped {100 * grouped['mfu_measured_gemm']:.1f}%) | {aim} |"]
    )


def test_performance_page_quotes_the_profile_and_the_levers():
    rt, profile = benchmark("cpu-minilm-rt"), benchmark("levers-profile")
    compiled, threads, imports = (
        benchmark("levers-compile"),
        benchmark("levers-threads"),
        benchmark("levers-imports"),
    )
    ops = {op["op"]: 100 * op["share"] for op in profile["top_ops"]}
    matmul, gemm = profile["share"]["matmul"], rt["gemm_gflops"]
    ours = rt["sides"]["scalelora"]["achieved_gflops"]
    grouped = rt["sides"][rt["comparator"]]["achieved_gflops"]
    one, two = threads["by_threads"]["1"], threads["by_threads"]["2"]
    steady = compiled["steady_step_seconds"]
    assert compiled["break_even_steps"] is None  # "it never pays back here at any run length"
    assert_quoted(
        "docs/performance.md",
        [
            f"torch.profiler self time over {profile['steps']} steps after {profile['skipped_steps']}, at "
            f"{profile['environment']['git_commit']};",
            f"**{100 * matmul:.1f}% in matmuls** (`aten::mm` {ops['aten::mm']:.1f}%, `aten::addmm` "
            f"{ops['aten::addmm']:.1f}%, `aten::bmm` {ops['aten::bmm']:.1f}%); dropout masks "
            f"{ops['aten::bernoulli_'] + ops['aten::random_'] + ops['aten::ge']:.1f}% (`aten::bernoulli_` "
            f"{ops['aten::bernoulli_']:.1f}%",
            f"`aten::random_` {ops['aten::random_']:.1f}% and `aten::ge` {ops['aten::ge']:.1f}%",
            f"s of profiled self time against {profile['self_seconds_total']:.2f} s now",
            f"So {100 * rt['mfu_measured_gemm']:.1f}% of the measured GEMM rate is the matmul share "
            f"({100 * matmul:.1f}%)",
            f"({ours:.1f} ÷ {matmul:.3f} = {ours / matmul:.0f} GFLOP/s, {100 * ours / matmul / gemm:.0f}% of "
            f"{gemm:.1f}",
            f"1.3 × {grouped:.1f} = {1.3 * grouped:.0f} GFLOP/s, {100 * 1.3 * grouped / gemm:.0f}% of the measured GEMM",
            f"the fused shape runs at {rt['gemm']['shapes']['hidden_x_3hidden']['gflops']:.1f} GFLOP/s against "
            f"{rt['gemm']['shapes']['hidden_x_hidden']['gflops']:.1f} for the separate",
            f"the CPU path is `bmm` + softmax ({ops['aten::bmm']:.1f}% and {ops['aten::_softmax']:.1f}% of a step)",
            f"{compiled['steps']} steps: {compiled['train_seconds']['compiled']:.1f} s of training against "
            f"{compiled['train_seconds']['eager']:.1f} s eager ({compiled['extra_seconds_over_the_run']:.1f} s of "
            f"compiling",
            f"after {compiled['steady_state_skipped_steps']} steps {steady['compiled']:.3f} against "
            f"{steady['eager']:.3f} s/step, **{compiled['steady_speedup']:.2f}x eager**",
            f"{threads['steps']} steps, {threads['repeats']} repeat: 1 thread {one['samples_per_second']:.1f} "
            f"samples/s ({100 * one['mfu_measured_gemm']:.1f}% of the 1-thread GEMM, {one['gemm_gflops']:.1f} "
            f"GFLOP/s), 2 threads {two['samples_per_second']:.1f} ({100 * two['mfu_measured_gemm']:.1f}% of "
            f"{two['gemm_gflops']:.1f}), **{threads['speedup_2_over_1']:.2f}x**",
            f"{imports['repeats']} alternating repeats: {imports['wall_seconds']['before']['median']:.2f} s with "
            f"the main branch ({imports['before_commit']}) against {imports['wall_seconds']['after']['median']:.2f} "
            f"s, **{imports['saved_seconds']:.1f} s saved**; importing DeepSpeed alone costs "
            f"{imports['import_seconds_after_torch_transformers_accelerate']['deepspeed']['median_seconds']:.2f} s "
            "and bitsandbytes "
            f"{imports['import_seconds_after_torch_transformers_accelerate']['bitsandbytes']['median_seconds']:.2f} s",
        ],
    )


def test_performance_page_quotes_earlier_measurements_from_their_commits():
    """ "Before" and "earlier" numbers: the same JSON files as committed at aed257b (measured at 0d35d28,
    before `train.mask_dropout`) and 0bc968f (cpu-minilm-rt remeasured at 47d84ba)."""
    ttr, kd = benchmark("cpu-minilm-ttr", "aed257b"), benchmark("cpu-minilm-kd", "aed257b")
    profile, first = benchmark("levers-profile", "aed257b"), benchmark("cpu-minilm-rt", "aed257b")
    second = benchmark("cpu-minilm-rt", "0bc968f")
    bernoulli = next(100 * op["share"] for op in profile["top_ops"] if op["op"] == "aten::bernoulli_")

    def fused_and_separate(report: dict) -> str:
        shapes = report["gemm"]["shapes"]
        return f"{shapes['hidden_x_3hidden']['gflops']:.1f} against {shapes['hidden_x_hidden']['gflops']:.1f}"

    assert_quoted(
        "docs/performance.md",
        [
            f"HF script took {ttr['sides']['hf_trainer_script']['phase_seconds']['train']:.1f} s of training in "
            f"the previous measurement ({hhmm(ttr)} UTC, at 0d35d28)",
            f"Both ratios were {kd['kd_cache_step_ratio']:.3f} and {kd['kd_self_step_ratio']:.3f} before "
            f"`train.mask_dropout` ({hhmm(kd)} UTC, at 0d35d28)",
            f"the same profile (at 0d35d28) had {100 * profile['share']['matmul']:.1f}% in matmuls and "
            f"**{bernoulli:.1f}% in `aten::bernoulli_`**, and {profile['self_seconds_total']:.2f} s of profiled "
            "self time",
            f"`bernoulli_` is gone from them ({bernoulli:.1f}% of a step before",
            f"(the {second['ratio']:.3f}x measured before it existed)",
            f"(in earlier runs {fused_and_separate(second)}, and {fused_and_separate(first)}:",
            f"in earlier runs {fused_and_separate(second)}, and +2%, {fused_and_separate(first)}:",
        ],
    )


def test_performance_page_quotes_the_fused_adamw_measurements():
    """The fused-AdamW row of docs/performance.md gives the committed levers-adamw JSONs' numbers."""
    import json

    page = (ROOT / "docs" / "performance.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| fused AdamW"))
    for name, digits in (("levers-adamw", 1), ("levers-adamw-48", 0)):
        report = json.loads((ROOT / "benchmarks" / "results" / f"{name}.json").read_text())
        steady, alone = report["steady_step_seconds"], report["optimizer_step_seconds"]
        assert f"[{name}](../benchmarks/results/{name}.json)" in row
        assert f"**{report['steady_speedup']:.2f}x**" in row
        assert f"{steady['default']:.3f} → {steady['fused']:.3f} s" in row
        assert f"{alone['default'] * 1000:.{digits}f} → {alone['fused'] * 1000:.{digits}f} ms" in row
    report = json.loads((ROOT / "benchmarks" / "results" / "levers-adamw.json").read_text())
    assert f"**{report['optimizer_step_speedup']:.1f}x**" in row
    short = benchmark("levers-adamw-48")
    assert "full fine-tune of MiniLM-L6 (22.7M trainable)" in row and "(22.7M trainable)" in report["work"]
    runs = [r["steps"] - r["steady_state_skipped_steps"] for r in (report, short)]
    assert f"single runs of {runs[0]} and {runs[1]} steps" in row


def test_performance_page_quotes_the_earlier_fused_adamw_pair_from_its_commit():
    """The first pair of levers-adamw runs, as committed with `train.fused_adamw` (ba0abc3)."""
    first = [benchmark(name, "ba0abc3")["steady_speedup"] for name in ("levers-adamw", "levers-adamw-48")]
    assert_quoted(
        "docs/performance.md", [f"an earlier pair of runs gave {first[0]:.2f}x and {first[1]:.2f}x"]
    )


def study_rows(data: dict) -> dict[tuple[str, str], dict]:
    return {(r["dataset"], r["run"]): r for r in data["results"]}


def study_minutes(data: dict, dataset: str) -> float:
    """A dataset's wall time in its last `make results`, in minutes."""
    return data["datasets"][dataset]["wall_seconds"] / 60


def test_results_page_quotes_results_json():
    from datetime import datetime, timedelta

    data = committed("results/results.json")
    rows = study_rows(data)
    f1 = {key: (r["test"].get("tuned") or r["test"])["macro_f1"] for key, r in rows.items()}
    # the sst2 default row before it was remade under autoconfig's rules v2
    then = study_rows(committed("results/results.json", "34502a0"))
    f1_then = {key: r["test"]["macro_f1"] for key, r in then.items()}
    from studies.results import SECTION_TITLES

    own = {
        d: sum(r["wall_seconds"] for r in data["results"] if r["dataset"] == d) / 60 for d in data["datasets"]
    }
    # "each of the six datasets is within the 90-minute aim in its rows' wall times" (the long-document and
    # decoder sections have their issues' budgets, docs/classification.md)
    assert {d for d in own if d not in SECTION_TITLES} == {
        "emotion",
        "rotten_tomatoes",
        "sst2",
        "codemix_tamil",
        "codemix_hindi",
        "goemotions",
    }
    assert max(t for d, t in own.items() if d not in SECTION_TITLES) < 90
    adapters = {f"{r['trainable_pct']:.2f}" for r in data["results"] if r["run"] == "lora_on_teacher"}
    finished = datetime.strptime(data["datasets"]["sst2"]["finished"], "%Y-%m-%d %H:%M")
    started = finished - timedelta(minutes=study_minutes(data, "sst2"))
    study = [c for c in data["targets"] if not c.get("section")]
    (tamil_bar,) = [
        c["bar"] for c in study if c["dataset"] == "codemix_tamil" and c["target"].startswith("lora_base_kd")
    ]
    clean = [c for c in study if not c["test_look"]]
    looked = [c for c in study if c["test_look"]]
    assert_quoted(
        "docs/results.md",
        [
            f"| r=8 on query/value ({adapters.pop()}% of the parameters)",
            f"codemix_tamil {study_minutes(data, 'codemix_tamil'):.0f} min (rerun on today's code, commit "
            f"{rows['codemix_tamil', 'teacher_full']['commit'][:7]}",
            f"run (6) scores {f1['codemix_tamil', 'lora_base_kd']:.4f} against a bar of {tamil_bar:.4f}",
            f"emotion's rows now add up to {own['emotion']:.0f} min",
            f"rotten_tomatoes {study_minutes(data, 'rotten_tomatoes'):.0f} min, "
            f"GoEmotions {study_minutes(data, 'goemotions'):.0f} min",
            f"sst2 {study_minutes(data, 'sst2'):.1f} min (quiet machine, commit 02100fa, "
            f"{finished:%Y-%m-%d} {started + timedelta(seconds=30):%H:%M}–{finished:%H:%M} UTC)",
            f"**{f1['sst2', 'lora_base_kd']:.4f}** with one",
            f"the default row 0.8929 → {f1_then['sst2', 'auto_default']:.4f} (as committed at\n34502a0; remade on "
            f"{rows['sst2', 'auto_default']['date']} under autoconfig's rules v2, it scores "
            f"{f1['sst2', 'auto_default']:.4f}, RESULTS.md)",
            f"**{sum(c['met'] for c in clean)} of {len(clean)} targets met with every setting chosen on validation**",
            f"{sum(c['met'] for c in looked)} of {len(looked)} more on rows marked †",
            f"against TF-IDF's {f1['codemix_hindi', 'tfidf_lr']:.4f} at lr 1e-4; "
            f"{f1['codemix_hindi', 'teacher_full']:.4f} at the recipe's lr 3e-5",
            f"codemix_hindi's rerun took {study_minutes(data, 'codemix_hindi'):.1f} min",
            f"sst2 also in one whole invocation ({study_minutes(data, 'sst2'):.1f} min, above)",
        ],
    )
    assert not adapters  # every LoRA-on-teacher row trains the same share, as the page says


def test_results_page_quotes_earlier_study_runs_from_their_commits():
    """The first runs the page compares with: results.json as committed after emotion's first run
    (561ec2c), codemix_hindi's first teacher (5538bc4) and sst2's first full run (20bf54c)."""
    emotion, hindi, sst2, tamil = (
        committed("results/results.json", c) for c in ("561ec2c", "5538bc4", "20bf54c", "d491ff4")
    )
    bars = {c["target"]: c for c in tamil["targets"] if c["dataset"] == "codemix_tamil"}
    margin = next(c["value"] - c["bar"] for t, c in bars.items() if t.startswith("lora_base_kd"))
    first = study_rows(sst2)
    assert_quoted(
        "docs/results.md",
        [
            f"emotion {study_minutes(emotion, 'emotion'):.0f} min (over the aim",
            f"codemix_hindi {study_minutes(hindi, 'codemix_hindi'):.1f} min (first run)",
            f"its first run took {study_minutes(tamil, 'codemix_tamil'):.0f} min",
            f"its run (6) cleared its bar by\n{margin:.4f}",
            f"codemix_hindi's teacher ({study_rows(hindi)['codemix_hindi', 'teacher_full']['test']['macro_f1']:.4f} "
            "against TF-IDF's",
            f"sst2's first full run took {study_minutes(sst2, 'sst2'):.1f} min, over the aim (its teacher's two "
            f"epochs {first['sst2', 'teacher_full']['train_seconds'] / 60:.0f} min, run (6)'s two epochs "
            f"{first['sst2', 'lora_base_kd']['train_seconds'] / 60:.0f} min)",
            f"test macro-F1 {first['sst2', 'lora_base_kd']['test']['macro_f1']:.4f} with two epochs",
            f"had reached {first['sst2', 'auto_default']['test']['macro_f1']:.4f} in one epoch",
            f"the default row {first['sst2', 'auto_default']['test']['macro_f1']:.4f} →",
        ],
    )


def test_classification_page_quotes_the_goemotions_rows():
    data = committed("results/results.json")
    recipe, tfidf = study_rows(data)["goemotions", "recipe"], study_rows(data)["goemotions", "tfidf_lr"]
    gold = committed("results/predictions/goemotions.json")["gold"]
    p99 = re.search(r"p99 (\d+)", data["datasets"]["goemotions"]["lengths"]).group(1)

    def cells(row: dict, bold: bool) -> str:
        tuned = row["test"]["tuned"]["macro_f1"]
        low, high = row["macro_f1_ci"]
        shown = f"**{tuned:.3f}**" if bold else f"{tuned:.3f}"
        return (
            f"| {row['train_seconds']:,.0f} | {row['validation']['tuned']['macro_f1']:.3f} | "
            f"{row['test']['macro_f1']:.3f} | {shown} ({low:.3f}–{high:.3f}) | {row['test']['tuned']['micro_f1']:.3f} "
            f"| {row['test']['tuned']['accuracy']:.3f} |"
        )

    ours, theirs = recipe["test"]["tuned"]["macro_f1"], tfidf["test"]["tuned"]["macro_f1"]
    assert ours >= theirs  # "the recipe meets the target"
    assert_quoted(
        "docs/classification.md",
        [
            f"max_length {recipe['max_length']} (the 99th percentile of the training texts' token lengths is {p99})",
            f"({len(tfidf['details']['thresholds'])} labels, {recipe['num_train_examples']:,} / 5,426 / "
            f"{len(gold):,} rows)",
            f"at commit {recipe['commit'][:7]} ({recipe['date']}, {recipe['machine'].split(',')[0]}, 2 cores, no other job; torch "
            f"{'.'.join(data['datasets']['goemotions']['versions']['torch'].split('.')[:2])} CPU;",
            f"| recipe `goemotions` ({recipe['details']['epochs']:.0f} epochs, {recipe['details']['steps']:,} steps) "
            + cells(recipe, bold=True),
            "| TF-IDF + one-vs-rest LR " + cells(tfidf, bold=False),
            f"the baseline row is from `make results DATASETS=goemotions` on {tfidf['date']};",
            f"C picked from 0.5 / 2 / 8 on the tuned validation macro-F1 ({tfidf['details']['C']:g} won)",
            f"at least the baseline's test macro-F1: +{100 * (ours - theirs):.1f} pt) and misses the aim of +5 pt "
            f"({theirs + 0.05:.3f})",
            f"Tuned thresholds are worth {100 * (ours - recipe['test']['macro_f1']):.1f} pt of test macro-F1 to the "
            f"recipe ({recipe['test']['macro_f1']:.3f} → {ours:.3f}) and "
            f"{100 * (theirs - tfidf['test']['macro_f1']):.0f} pt to the baseline",
        ],
    )


def test_training_page_quotes_the_data_scale_benchmark():
    """docs/training.md's data-at-scale table, targets and 10M estimate, rebuilt from the committed JSON."""
    data = committed("benchmarks/results/data-scale-cpu.json")
    assert not data["dry_run"] and data["environment"]["machine"]["cores"] == 2
    r, targets = data["results"], data["targets"]

    def gib(b: float) -> float:
        return b / 2**30

    quotes = [f"this project's 2-core AMD EPYC, {data['environment']['date'][:10]}"]
    for variant, name in (
        ("short-2", "short texts, 2 classes"),
        ("mixed-500", "500 classes, 1% ~2,000-token texts"),
    ):
        two, one = r["2000000"][variant], r["1000000"][variant]
        s2, s1 = two["scalelora"], one["scalelora"]
        quotes.append(
            f"| {name} | {s2['first_step_seconds']:.0f} s | {two['peer']['load_tokenize_seconds']:.0f} s | "
            f"{two['ratios']['first_step_over_peer_load_tokenize']:.2f}x | "
            f"{gib(s2['peak_rss_bytes_at_first_step']):.2f} GiB ({gib(two['peer']['peak_rss_bytes']):.2f} GiB) | "
            f"{two['ratios']['second_to_first_data_memory']:.2f} | "
            f"{two['scalelora_cached']['first_step_seconds']:.0f} s |"
        )
        # "the issue's targets hold at 2M for both"
        assert s2["first_step_seconds"] <= targets["first_step_seconds_at_2m"]
        assert (
            two["ratios"]["first_step_over_peer_load_tokenize"]
            <= targets["first_step_over_peer_load_tokenize"]
        )
        assert gib(s2["peak_rss_bytes_at_first_step"]) <= targets["peak_rss_gib"]
        assert two["ratios"]["second_to_first_data_memory"] <= targets["second_to_first_data_memory"]
        # the 10M estimate: the 1M -> 2M slope carried on over 8M more rows
        slope = s2["first_step_seconds"] - s1["first_step_seconds"]
        quotes.append(f"about {(s2['first_step_seconds'] + 8 * slope) / 60:.0f} min to the first step")
        memory = gib(s2["peak_rss_bytes_at_first_step"])
        memory += 8 * (memory - gib(s1["peak_rss_bytes_at_first_step"]))
        quotes.append(
            f"{memory:.1f} GiB ({'short texts, 2 classes' if variant == 'short-2' else '500 classes'}"
        )
    short, mixed = r["1000000"]["short-2"]["scalelora"], r["1000000"]["mixed-500"]["scalelora"]
    small = r["100000"]["short-2"]
    quotes += [
        f"at 1M the first step came at {short['first_step_seconds']:.0f} s and {mixed['first_step_seconds']:.0f} s",
        f"The first log line came {r['2000000']['short-2']['scalelora']['first_line_seconds']:.1f} s and "
        f"{r['2000000']['mixed-500']['scalelora']['first_line_seconds']:.1f} s after launch",
        f"at 100k rows the first step came at {small['scalelora']['first_step_seconds']:.1f} s, "
        f"{small['ratios']['first_step_over_peer_load_tokenize']:.2f}x the peer's load + tokenize alone but "
        f"{small['ratios']['first_step_over_peer_launch_to_tokenized']:.2f}x",
    ]
    assert_quoted("docs/training.md", quotes)


def test_readme_and_docs_quote_the_cpu_precision_measurement():
    """The bf16-on-CPU figures in README.md, docs/performance.md and docs/training.md, rebuilt from the
    JSON that runtime.CPU_BF16_MEASURED cites."""
    from scalelora.runtime import CPU_BF16_MEASURED

    pays, source = CPU_BF16_MEASURED["avx512_bf16"]
    data = committed(source)
    fp32, bf16, hf = (data["sides"][k] for k in ("scalelora_fp32", "scalelora_bf16", "hf_trainer_bf16"))
    assert pays and data["bf16_pays"] and data["repeats"] == 2 and not data["smoke"]
    assert_quoted(
        "README.md",
        [
            f"ran\n{bf16['train_seconds']:.0f} s of training against {fp32['train_seconds']:.0f} s, test accuracy "
            f"{bf16['test_accuracy']:.4f} both",
        ],
    )
    assert f"{fp32['test_accuracy']:.4f}" == f"{bf16['test_accuracy']:.4f}"
    assert_quoted(
        "docs/performance.md",
        [
            f"bf16 **{data['bf16_over_fp32']:.2f}x** the fp32 steady samples/s "
            f"({bf16['steady_samples_per_second']:.1f} against {fp32['steady_samples_per_second']:.1f}), test "
            f"accuracy {bf16['test_accuracy']:.4f} both, peak RSS {bf16['peak_rss_bytes'] / 2**30:.2f} against "
            f"{fp32['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"in the same run {hf['steady_samples_per_second']:.1f} samples/s (scalelora bf16 "
            f"{data['bf16_over_hf_bf16']:.2f}x it)",
            f"--repeats {data['repeats']}` (`{source}`, 2-core AMD EPYC, {data['environment']['date'][:10]})",
        ],
    )
    assert_quoted(
        "docs/training.md",
        [
            f"ran {data['bf16_over_fp32']:.2f}x the fp32 steady samples/s in bf16, test accuracy equal at "
            f"{bf16['test_accuracy']:.4f}"
        ],
    )
    assert_quoted(
        "docs/scale-out.md", [f"measured\n{data['bf16_over_fp32']:.2f}x faster at equal test accuracy"]
    )


def agreement_pair() -> tuple[str, str]:
    from studies.results import AGREEMENT

    return AGREEMENT["emotion_decoder"]


def test_classification_page_quotes_the_decoder_rows():
    """docs/classification.md's decoder results: D1 and D3 from results.json (the D3 bar from emotion's row
    (2)) and memory against MiniLM from the rows."""
    data = committed("results/results.json")
    rows = study_rows(data)
    d1, d3 = rows["emotion_decoder", "smollm2_lora"], rows["emotion_decoder", "minilm_from_smollm2"]
    d2 = rows["emotion_decoder", "smollm2_lora_4bit"]
    bar = rows["emotion", "lora_on_teacher"]["test"]["macro_f1"] - 0.01
    agreement = data["datasets"]["emotion_decoder"]["agreement"]
    # the agreement results.json keeps is the one the committed predictions give
    from studies.results import agreement_on_test

    assert (
        agreement_on_test(ROOT / "results" / "predictions" / "emotion_decoder.json", *agreement_pair())
        == agreement
    )
    low, high = (100 * x for x in d2["vs_teacher_ci"])
    minutes = {name: row["train_seconds"] / 60 for name, row in (("d1", d1), ("d2", d2))}
    memory = {name: row["peak_memory_gb"]["host"] for name, row in (("d1", d1), ("d2", d2))}
    rows_wall = sum(r["wall_seconds"] for r in (d1, d2, d3)) / 60

    def line(row: dict, name: str) -> str:
        (alow, ahigh), (flow, fhigh) = row["accuracy_ci"], row["macro_f1_ci"]
        return (
            f"| {name} | {row['trainable_pct']:.2f}% | {row['train_seconds'] / 60:.1f} min | "
            f"{row['peak_memory_gb']['host']:.2f} GiB | {row['test']['accuracy']:.4f} ({alow:.3f}–{ahigh:.3f}) | "
            f"{row['test']['macro_f1']:.4f} ({flow:.3f}–{fhigh:.3f}) |"
        )

    assert d1["test"]["accuracy"] >= 0.91  # "D1 meets its target"
    assert d2["test"]["accuracy"] >= d1["test"]["accuracy"] - 0.01  # "D2 meets its target"
    assert low < 0 < high  # "no difference is shown either way"
    assert rows_wall <= 180  # "the issue allowed 3 hours"
    met = d3["test"]["macro_f1"] >= bar
    assert_quoted(
        "docs/classification.md",
        [
            f"recipe; {d1['date']}, this project's 2-core AMD EPYC, float32",
            line(d1, "(D1) SmolLM2-135M + LoRA, float32 base"),
            line(d2, "(D2) SmolLM2-135M + LoRA, 4-bit (nf4) base"),
            line(d3, "(D3) MiniLM-L6 + LoRA, distilled from D1"),
            f"meets its target (test accuracy within 1 pt of D1's: {d2['test']['accuracy']:.4f} against "
            f"{d1['test']['accuracy']:.4f})",
            f"It gives D1's label to {agreement['same']:,} of {agreement['of']:,} test texts ({agreement['share']:.4f})",
            f"its test macro-F1 is {d2['test']['macro_f1']:.4f} against D1's {d1['test']['macro_f1']:.4f}, a paired "
            f"95% interval of the difference of {low:.1f} to +{high:.1f} pt, so no difference is shown",
            f"D2 peaked at {memory['d2']:.2f} GiB of host memory against D1's {memory['d1']:.2f} GiB "
            f"({memory['d2'] / memory['d1']:.2f}x) and trained in {minutes['d2']:.1f} min against "
            f"{minutes['d1']:.1f} ({minutes['d2'] / minutes['d1']:.2f}x)",
            f"The three rows took {rows_wall:.1f} min of wall time",
            f"D1 meets its target (test accuracy at least 0.91: {d1['test']['accuracy']:.4f})",
            f"D3's test macro-F1 {d3['test']['macro_f1']:.4f} {'meets' if met else 'misses'} its bar of {bar:.4f}",
            f"D1 peaked at {d1['peak_memory_gb']['host']:.2f} GiB of host memory, the MiniLM-L6 student at "
            f"{d3['peak_memory_gb']['host']:.2f} GiB ({d1['peak_memory_gb']['host'] / d3['peak_memory_gb']['host']:.1f}x)",
        ],
    )


def test_classification_page_quotes_the_decoder_pilot():
    """The 100-step pilot that sized the decoder rows: speed, memory and agreement of the two bases."""
    pilot = committed("benchmarks/results/decoder-pilot-cpu.json")
    d1, d2 = pilot["sides"]["d1_float32_base"], pilot["sides"]["d2_4bit_base"]
    agree = pilot["agreement"]
    assert pilot["steps"] == 100 and d1["global_step"] == d2["global_step"] == 100
    assert (
        round(d2["samples_per_second"] / d1["samples_per_second"], 3)
        == pilot["d2_over_d1_samples_per_second"]
    )
    assert "shared the 2 cores" in pilot["note"]  # the "lower bound" the page says
    assert_quoted(
        "docs/classification.md",
        [
            f"the 4-bit base trained at {pilot['d2_over_d1_samples_per_second']:.3f}x the float32 base's samples/s "
            f"({d2['samples_per_second']:.2f} against {d1['samples_per_second']:.2f}; a lower bound",
            f"peaked at {d2['peak_memory_gb']['host']:.2f} GiB of host memory against "
            f"{d1['peak_memory_gb']['host']:.2f} GiB",
            f"the two agreed on {agree['same_label']:,} of {agree['validation_texts']:,} validation texts "
            f"({agree['share']:.3f}), validation accuracy {d2['validation']['accuracy']:.4f} against "
            f"{d1['validation']['accuracy']:.4f}",
        ],
    )


def test_make_test_runs_the_long_files_first_on_a_share_of_the_cores(monkeypatch):
    """The README's CI sentence: whole files per worker, the longest first, one thread each on two cores."""
    import conftest

    make_test = re.search(r"^test:.*?\n((?:\t.*\n)+)", (ROOT / "Makefile").read_text(), re.M).group(1)
    # without --no-loadscope-reorder xdist queues the files by their number of tests, and the one-test
    # quickstart file would start last
    assert "--dist loadfile" in make_test and "--no-loadscope-reorder" in make_test
    for name in conftest.LONG_FILES_FIRST:
        assert (ROOT / "tests" / name).is_file(), f"{name} is named in LONG_FILES_FIRST but does not exist"

    class Item:
        def __init__(self, name):
            self.path = ROOT / "tests" / name

    items = [
        Item(n) for n in ("test_a.py", "test_faults.py", "test_quickstart.py", "test_b.py", "test_bench.py")
    ]
    conftest.pytest_collection_modifyitems(None, items)
    assert [i.path.name for i in items] == [
        "test_quickstart.py",
        "test_bench.py",
        "test_faults.py",
        "test_a.py",
        "test_b.py",
    ]
    # the share of the cores each worker's torch gets
    monkeypatch.setattr(conftest.os, "sched_getaffinity", lambda pid: {0, 1})
    assert conftest.worker_threads(2) == 1 and conftest.worker_threads(0) is None
    assert conftest.worker_threads(1) == 2 and conftest.worker_threads(4) == 1


def tokens_a_document(entry: dict) -> float:
    """A benchmark side's tokens per document (its tokens/s over its documents/s)."""
    return entry["tokens_per_second"] / entry["samples_per_second"]


def long_text_cost(report: dict) -> str:
    """docs/classification.md's measured cost of each long-text mode, from cpu-minilm-imdb-long."""
    sides, hf = report["sides"], report["sides"][report["comparator"]]
    ours, head_tail, chunk = (sides[s] for s in ("scalelora", "scalelora_head_tail", "scalelora_chunk"))
    env, per_doc = report["environment"], tokens_a_document

    def tokens(entry: dict) -> str:
        return f"{entry['tokens_per_second'] / hf['tokens_per_second']:.2f}x"

    return (
        f"Measured on {env['machine']['cpu']} ({env['machine']['cores']} cores), {env['date'][:10]}, "
        f"{report['repeats']} repeats of {report['steps']} steps of {report['batch_size']} documents, fp32: "
        f"scalelora truncating at 512 reads {tokens(ours)} the tokens/s of HF `Trainer` + PEFT truncating at 512 "
        f"(length-grouped, {hf['tokens_per_second']:,.0f} tokens/s) and does "
        f"{ours['achieved_gflops'] / hf['achieved_gflops']:.2f}x its GFLOP/s; `head_tail` 512 costs what "
        f"truncation costs ({tokens(head_tail)}, the same {per_doc(head_tail):.0f} tokens a review); `chunk` "
        f"256/64 reads {per_doc(chunk) / per_doc(ours):.2f}x the tokens a review ({per_doc(chunk):.0f} against "
        f"{per_doc(ours):.0f}) at {tokens(chunk)} HF's tokens/s, so "
        f"{chunk['samples_per_second'] / ours['samples_per_second']:.2f}x truncation's documents/s, with a peak "
        f"RSS of {mib(chunk['peak_memory_bytes'])} MiB against {mib(ours['peak_memory_bytes'])} MiB. Documents/s "
        f"do not compare across HF and scalelora here: HF's timed steps held longer reviews "
        f"({per_doc(hf):.0f} tokens a review)"
    )


def test_long_documents_quote_the_committed_long_text_benchmark():
    """The long-text scenario's JSON: its table in benchmarks/README.md, each mode's cost in docs/classification.md."""
    from benchmarks.plot import throughput_table

    report = benchmark("cpu-minilm-imdb-long")
    assert (
        not report["smoke"] and report["scenario"] == "cpu-minilm-imdb-long" and report["max_length"] == 512
    )
    sides = report["sides"]
    per_doc = {side: tokens_a_document(entry) for side, entry in sides.items()}
    assert sides["scalelora_head_tail"]["repeats"][0]["tokens"] == sides["scalelora"]["repeats"][0]["tokens"]
    assert_quoted("benchmarks/README.md", throughput_table(report))
    assert_quoted(
        "benchmarks/README.md",
        [
            f"Committed run ({report['environment']['machine']['cpu']}, 2 cores, {report['environment']['date'][:10]}, "
            f"machine idle, commit {report['environment']['git_commit']})",
            f"({per_doc['hf_trainer_grouped']:.0f} tokens a review against {per_doc['scalelora']:.0f})",
            f"`chunk` reads every window ({per_doc['scalelora_chunk']:.0f} tokens a review)",
        ],
    )
    assert_quoted("docs/classification.md", [long_text_cost(report)])
    # why HF's timed steps read longer reviews: its length-grouped order sorts each megabatch of 50 batches
    # longest first (the page says so)
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    lengths = torch.randperm(4000, generator=torch.Generator().manual_seed(0)).tolist()
    order = get_length_grouped_indices(lengths, 16, generator=torch.Generator().manual_seed(0))
    first = [lengths[i] for i in order[: 50 * 16]]
    assert first == sorted(first, reverse=True)


def imdb_mode(row: dict) -> str:
    """How a trained imdb row reads a review, from its own config: `truncate` 256, `chunk` 256/64 mean, ..."""
    data = row["config"]["data"]
    mode = f"`{data['long_text']}` {data['max_length']}"
    if data["long_text"] == "chunk":
        mode += f"/{data['chunk_stride']} {data['chunk_pool']}, at most {data['max_chunks']} windows"
    return mode


def imdb_line(row: dict) -> str:
    """A trained imdb row as docs/classification.md's IMDB table gives it."""
    from studies.results import LONG_TEXT_RUNS

    name = f"`{row['run']}`" if row["run"] in LONG_TEXT_RUNS else "default (`data.path=imdb` only)"
    low, high = row["accuracy_ci"]
    return (
        f"| {name} | {imdb_mode(row)} | {row['test']['accuracy']:.4f} ({low:.3f}–{high:.3f}) | "
        f"{row['validation']['accuracy']:.4f} | {row['train_tokens']:,} | "
        f"{row['train_seconds'] / 60:.0f} min | {row['peak_memory_gb']['host']:.1f} GiB | `{row['commit'][:7]}` |"
    )


def test_long_documents_quote_the_imdb_rows_committed_so_far():
    """docs/classification.md's IMDB paragraph gives the imdb section's committed rows: TF-IDF and the target
    it sets, a table line per trained row (from its own config and numbers), and the rows still to run."""
    from studies.results import DATASET_RUNS, LONG_TEXT_GAIN, LONG_TEXT_RUNS

    data = committed("results/results.json")
    tfidf = study_rows(data)["imdb", "tfidf_lr"]
    low, high = tfidf["accuracy_ci"]
    trained = [r for r in data["results"] if r["dataset"] == "imdb" and r["run"] != "tfidf_lr"]
    missing = [
        run
        for run in DATASET_RUNS["imdb"]
        if run not in {r["run"] for r in data["results"] if r["dataset"] == "imdb"}
    ]
    modes = [r for r in trained if r["run"] in LONG_TEXT_RUNS]
    setups = {
        (
            r["config"]["train"]["epochs"],
            r["num_train_examples"],
            r["config"]["train"]["batch_size"] * r["config"]["train"]["grad_accum"],
            r["config"]["train"]["precision"],
        )
        for r in modes
    }
    assert len(setups) == 1, setups  # the page gives the mode rows one setup
    ((epochs, examples, per_step, precision),) = setups
    assert epochs == 1 and precision == "no"
    quotes = [
        f"each mode's row trains one epoch of the {examples:,} training reviews, {per_step} reviews a step, fp32",
        f"reaches test accuracy {tfidf['test']['accuracy']:.4f} (95% CI {low:.3f}–{high:.3f}; validation "
        f"{tfidf['validation']['accuracy']:.4f}), so the target of the long-text row best on validation is "
        f"{tfidf['test']['accuracy'] + LONG_TEXT_GAIN:.4f}",
        *(imdb_line(row) for row in trained),
    ]
    if missing:
        quotes.append(f"Rows not run yet: {', '.join(f'`{run}`' for run in missing)}.")
    assert_quoted("docs/classification.md", quotes)
    # the page's table has no line for a row results.json lacks
    page = (ROOT / "docs" / "classification.md").read_text()
    row_line = re.compile(r"^\| (`\w+`|default \(`data.path=imdb` only\)) \| `(truncate|head_tail|chunk)` ")
    table = [line for line in page.splitlines() if row_line.match(line)]
    assert len(table) == len(trained), table


def imdb_cost(row: dict, reference: dict) -> str:
    """A long-text mode's row against `truncate_256`, as docs/classification.md's "Which mode" gives it."""
    low, high = row["vs_teacher_ci"]  # the paired macro-F1 interval against PAIRED_REFERENCE["imdb"]
    gain = row["test"]["accuracy"] - reference["test"]["accuracy"]
    return (
        f"`{row['run']}` read {row['train_tokens'] / reference['train_tokens']:.2f}x the training tokens of "
        f"`{reference['run']}` and trained {row['train_seconds'] / reference['train_seconds']:.2f}x as long, at "
        f"{row['peak_memory_gb']['host'] / reference['peak_memory_gb']['host']:.2f}x its peak host memory, for "
        f"{100 * gain:+.1f} pt of test accuracy (paired 95% CI of the macro-F1 gain {100 * low:+.1f} to "
        f"{100 * high:+.1f} pt)"
    )


def test_long_documents_which_mode_gives_each_committed_modes_cost_and_gain_from_its_row():
    """Each committed long-text mode row's tokens, time, memory and gain against truncate-256, as ratios of the
    two rows of results.json (the docs' "Which mode" paragraph), for every mode row committed."""
    from studies.results import LONG_TEXT_RUNS, PAIRED_REFERENCE

    rows = study_rows(committed("results/results.json"))
    reference = rows["imdb", PAIRED_REFERENCE["imdb"]]
    runs = [run for run in LONG_TEXT_RUNS if run != reference["run"] and ("imdb", run) in rows]
    assert runs, "no long-text mode row beside truncate-256 is committed"
    quotes = [imdb_cost(rows["imdb", run], reference) for run in runs]
    if ("imdb", "chunk") in rows and ("imdb", "head_tail_512") in rows:  # the two modes that read past 256
        pair = [rows["imdb", "head_tail_512"], rows["imdb", "chunk"]]
        first, second = sorted(pair, key=lambda r: -r["validation"]["accuracy"])
        a, b = first["test"]["accuracy"], second["test"]["accuracy"]
        va, vb = first["validation"]["accuracy"], second["validation"]["accuracy"]
        quotes.append(
            f"On validation `{first['run']}` scored {'above' if va > vb else 'level with'} `{second['run']}` "
            f"({va:.4f} against {vb:.4f}); on test it scored "
            f"{'above' if a > b else 'below' if a < b else 'level with'} it ({a:.4f} against {b:.4f})"
        )
        # "On IMDB, then": both gained about 2 pt; head_tail above chunk on both splits by so much on test, for
        # fewer tokens and less training time; chunk the lowest peak of the three
        head_tail, chunk = pair
        gains = {round(100 * (r["test"]["accuracy"] - reference["test"]["accuracy"])) for r in pair}
        quotes.append(f"reading past 256 tokens paid (both modes gained about {gains.pop()} pt)")
        assert not gains, "the page gives the two modes one rounded gain"
        gap = head_tail["test"]["accuracy"] - chunk["test"]["accuracy"]
        assert gap > 0 and head_tail["validation"]["accuracy"] > chunk["validation"]["accuracy"]
        assert head_tail["train_tokens"] < chunk["train_tokens"]
        assert head_tail["train_seconds"] < chunk["train_seconds"]
        quotes.append(
            f"(above it on both splits, by {100 * gap:.2f} pt on test, a gap with no paired interval"
        )
        three = [reference, *pair]
        assert min(three, key=lambda r: r["peak_memory_gb"]["host"]) is chunk
        train = chunk["config"]["train"]
        quotes.append(
            f"`chunk` had the lowest peak of the three (its recipe line trains micro-batches of "
            f"{train['batch_size']} reviews, {train['grad_accum']} accumulated)"
        )
    assert_quoted("docs/classification.md", quotes)


def test_long_documents_quote_the_chunk_pooling_sweep():
    """The IMDB paragraph gives the committed validation-only sweep that chose the chunk row's pooling."""
    sweep = committed("results/sweeps/imdb_chunk_pool/sweep.json")
    runs = {r["data.chunk_pool"]: r for r in sweep["runs"]}
    fixed = dict(item.split("=", 1) for item in sweep["fixed"])
    steps = int(fixed["train.max_steps"])
    per_step = int(fixed["train.batch_size"]) * int(fixed["train.grad_accum"])
    best = max(runs, key=lambda pool: runs[pool]["macro_f1"])
    some = runs[best]
    scores = ", ".join(f"`{pool}` {runs[pool]['macro_f1']:.4f}" for pool in ("mean", "max", "logmeanexp"))
    assert_quoted(
        "docs/classification.md",
        [
            f"The `chunk` row pools with `{best}`, chosen by a validation-only sweep of the three poolings "
            f"([results/sweeps/imdb_chunk_pool](../results/sweeps/imdb_chunk_pool/sweep.md); the row's windows, "
            f"{steps} steps of {per_step} reviews each, {some['finished'][:10]}, commit `{some['commit'][:7]}`): validation "
            f"macro-F1 {scores}",
            f"The three are within {100 * (runs[best]['macro_f1'] - min(r['macro_f1'] for r in runs.values())):.2f} "
            "pt of each other",
        ],
    )


def test_the_markup_share_the_docs_quote_is_the_shipped_datas():
    """docs/classification.md says autoconfig cleans IMDB's markup, with its share, and that no other shipped
    set has any: measured here on each set's training split, as autoconfig measures it."""
    from conftest import SHARED_DATA
    from scalelora import autoconfig
    from scalelora import data as data_lib
    from scalelora.config import DataConfig

    train = {
        folder.name: data_lib.load_splits(DataConfig(path=str(folder)), 0).train
        for folder in sorted(SHARED_DATA.iterdir())
        if (folder / "labels.json").is_file()
    }
    shares = {name: autoconfig.markup_share(rows) for name, rows in train.items()}
    assert len(shares) == 7 and [
        name for name, share in shares.items() if share > autoconfig.MARKUP_SHARE
    ] == ["imdb"]
    assert [name for name, share in shares.items() if share > 0] == ["goemotions", "imdb"]
    assert_quoted(
        "docs/classification.md",
        [
            f"`scalelora: auto: data.clean_html=True ({100 * shares['imdb']:.1f}% of {len(train['imdb']):,} "
            "training texts carry HTML markup ...)` on IMDB, the only shipped set over 1%; of the others only "
            f"GoEmotions has any, {round(shares['goemotions'] * len(train['goemotions']))} text of "
            f"{len(train['goemotions']):,})"
        ],
    )
