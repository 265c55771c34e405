"""Every relative link in README.md and docs/*.md resolves: the file (or folder) exists and, for a
link into a Markdown file, its #anchor is one of that file's headings (GitHub's anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PAGES = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def _prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text (code spans and links as their text),
    lower-cased, without punctuation other than '-' and '_', spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link: its text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(_prose(page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    prose = CODE_SPAN.sub("", _prose(page.read_text()))
    return LINK.findall(prose)


def test_slug_matches_githubs():
    assert slug("Plan the next run: `plan` and `fit`") == "plan-the-next-run-plan-and-fit"
    assert slug("TinyLlama-1.1B at full size (`benchmarks/scale.py`)") == (
        "tinyllama-11b-at-full-size-benchmarksscalepy"
    )
    assert slug("Which strategy for a 1B model: DDP, FSDP, HSDP or ZeRO") == (
        "which-strategy-for-a-1b-model-ddp-fsdp-hsdp-or-zero"
    )


def test_the_pages_have_links():
    assert len(PAGES) > 5
    readme_links = links(REPO_ROOT / "README.md")
    assert any(target.startswith("docs/") for target in readme_links)
    assert any("benchmarks/RESULTS.md" in target for target in readme_links)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(REPO_ROOT)} has broken links: {broken}"
