"""Every Python block of the documentation runs and prints what its page shows."""

from pathlib import Path

import pytest

import _run_code as run_code

DOCS = Path(__file__).parent.parent / "docs"

PAGES = sorted(p for p in DOCS.rglob("*.md") if run_code.blocks(p))


def test_some_pages_have_code():
    assert len(PAGES) >= 8


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_page_code_runs(page):
    problems = run_code.run_page(page)
    assert not problems, "\n\n".join(problems)
