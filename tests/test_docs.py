"""The Python blocks of the docs run as written, in order, one namespace a page.

(docs/guide.md's blocks run in tests/test_examples.py; docs/parallel.md's
first block is a fragment over names the page defines in prose.)
"""

import re
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    "README.md",
    "docs/core.md",
    "docs/layers.md",
    "docs/transformer.md",
    "docs/gradcheck.md",
    "docs/training.md",
    # The page restores a damaged checkpoint: Orbax leaves the other reads of
    # that restore pending on a closed event loop, which Python reports as
    # unraisable exceptions when it collects them.
    pytest.param(
        "docs/weights.md",
        marks=pytest.mark.filterwarnings(
            "ignore::pytest.PytestUnraisableExceptionWarning"
        ),
    ),
]


def python_blocks(page: str) -> list[str]:
    text = (ROOT / page).read_text()
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]


@pytest.mark.parametrize("page", PAGES)
def test_page_code_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pages may write files (checkpoints, plots)
    blocks = python_blocks(page)
    assert blocks, f"{page} has no Python blocks"
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page} block {i}", "exec"), namespace)


def test_doctest_pages():
    import doctest

    result = doctest.testfile(
        str(ROOT / "docs/activations_and_losses.md"),
        module_relative=False,
        optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS,
    )
    assert result.attempted > 0 and result.failed == 0
