"""The docs' measured tables are what bench/tables.py renders from bench/results/*.json (no figure is edited by
hand), every result file says where its figures come from, and every relative link in README.md and docs/*.md
points to a file (and heading) that exists."""
from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def load(name: str):
    """A bench module by file (bench/ is scripts, not a package); registered so its dataclasses resolve."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_tables():
    return load("tables")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_table_block_is_what_the_generator_renders_from_the_results(path):
    tables = load_tables()
    text = path.read_text()
    blocks = list(tables.BLOCK.finditer(text))
    for block in blocks:
        expected = tables.render(block.group("name"))
        assert block.group("body") == expected, (
            f"{path.name}: table {block.group('name')} differs from bench/results: run .venv/bin/python bench/tables.py")
    # a marker without its end (or a typo in it) would hide a table from the check
    openings = re.findall(r"(?m)^<!-- table:", text)
    closings = re.findall(r"(?m)^<!-- /table -->", text)
    assert len(openings) == len(closings) == len(blocks), path.name


def test_every_table_is_used_and_every_result_names_its_origin():
    tables = load_tables()
    used = {m.group("name") for path in DOCUMENTS for m in tables.BLOCK.finditer(path.read_text())}
    assert used == set(tables.TABLES), f"tables never placed in a document: {sorted(set(tables.TABLES) - used)}"
    for path in sorted((ROOT / "bench" / "results").glob("*.json")):
        record = json.loads(path.read_text())
        assert record["name"] == path.stem, path.name
        for field in ("date", "command", "machine", "figures"):
            assert record.get(field), f"{path.name} has no {field}"
        # measured here: the commit it was measured at; transcribed: says so
        assert record.get("git_commit") or record.get("source", "").startswith("transcribed from README at commit"), path.name


def test_the_generator_renders_a_changed_figure_and_the_check_sees_it(tmp_path, monkeypatch):
    tables = load_tables()
    # an independent expectation: a result written by the benches' own helper shows up in the rendered table
    results = load("results")
    record = json.loads((ROOT / "bench" / "results" / "worker_resources.json").read_text())
    figures = record["figures"]
    figures["rows"][0]["cpu_s_per_frame"] = 0.123456
    written = results.write_result("worker_resources", figures, command="bench/worker_resources.py --test",
                                   directory=tmp_path)
    again = json.loads(written.read_text())
    assert again["command"] == "bench/worker_resources.py --test" and again["machine"]["cpu"]["cores"] >= 1
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    rendered = tables.render("worker_resources")
    assert "| 0.123 |" in rendered and "bench/worker_resources.py --test" in rendered
    stale = "<!-- table:worker_resources -->\n| old |\n<!-- /table -->"
    assert tables.rendered(stale) == f"<!-- table:worker_resources -->\n{rendered}<!-- /table -->"


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_relative_link_points_to_an_existing_file_and_heading(path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: are not checked (no network)
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{path.name}: " + "; ".join(broken)
