"""The documentation's links: every relative link in README.md and docs/ points to a file of the
repository (and, with `#anchor`, to a heading of that page), and every page in docs/ is reachable
from the README; every key of config.py is documented."""

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


def test_performance_page_quotes_the_committed_benchmark_json():
    """The headline numbers of docs/performance.md are the committed JSON's, rounded as printed."""
    import json

    results = ROOT / "benchmarks" / "results"
    page = (ROOT / "docs" / "performance.md").read_text()
    rt = json.loads((results / "cpu-minilm-rt.json").read_text())
    kd = json.loads((results / "cpu-minilm-kd.json").read_text())
    ttr = json.loads((results / "cpu-minilm-ttr.json").read_text())
    quoted = {
        "`ratio` = {:.3f}": rt["ratio"],
        "`ratio_default` = {:.3f}": rt["ratio_default"],
        "`tokens_ratio` = {:.3f}": rt["tokens_ratio"],
        "`memory_ratio` = {:.3f}": rt["memory_ratio"],
        "`gemm_gflops` = {:.1f}": rt["gemm_gflops"],
        "`mfu_measured_gemm` = {:.1f}%": 100 * rt["mfu_measured_gemm"],
        "`kd_cache_step_ratio` = {:.3f}": kd["kd_cache_step_ratio"],
        "`kd_self_step_ratio` = {:.3f}": kd["kd_self_step_ratio"],
    }
    missing = [form.format(value) for form, value in quoted.items() if form.format(value) not in page]
    assert not missing, f"docs/performance.md does not quote the committed JSON: {missing}"
    assert f"`ratio` = {ttr['ratio']:.3f}" in page  # time to result
    assert rt["comparator"] == "hf_trainer_grouped" and f"`comparator` = `{rt['comparator']}`" in page


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
