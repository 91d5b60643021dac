"""The docs stay true to the project: the params reference lists exactly params.yaml's keys and defaults, the
README shows the committed results and stays a manual, and every link between the docs leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from inatpipe.params.load import _Loader

from .conftest import ROOT

DOCS = sorted((ROOT / "docs").glob("*.md"))


def leaves(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for key, value in tree.items():
        out += leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [(f"{prefix}{key}", value)]
    return out


def test_params_reference_lists_every_key_with_its_shipped_default():
    shipped = leaves(yaml.load((ROOT / "params.yaml").read_text(), Loader=_Loader))
    rows = re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \| (.+) \|$", (ROOT / "docs/params.md").read_text(), re.M)
    assert [key for key, _, _ in rows] == [key for key, _ in shipped]  # every key, in params.yaml's order
    for (key, default, meaning), (_, value) in zip(rows, shipped, strict=True):
        assert yaml.load(default, Loader=_Loader) == value, f"docs/params.md gives {key} the default {default}"
        assert meaning.strip(), key


def test_readme_is_a_manual_of_at_most_300_lines():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for command in ("make run", "make test", "dvc repro", "dvc exp run -S", "dvc plots show"):
        assert command in readme


def test_readme_shows_the_committed_results():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("<!-- results:start -->\n")[1].split("<!-- results:end -->")[0]
    assert table == (ROOT / "metrics/compare.md").read_text()


def anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a file's headings: lower case, punctuation dropped, spaces as hyphens."""
    slugs = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_every_link_between_the_docs_leads_somewhere(page: Path):
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert local or page.name != "README.md"
    for link in local:
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        assert file.exists(), f"{page.name}: {link} leads nowhere"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file.read_text()), f"{page.name}: no heading #{anchor} in {file.name}"
