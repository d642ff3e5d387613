"""The README's claims trace to tests: every test it cites by name, linked to a file, is defined in that file.

A renamed or deleted test would otherwise leave the README pointing at evidence that no longer exists.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cited_tests(markdown: str) -> list[tuple[str, str]]:
    """(test name, file) for every ``test_*`` name inside a link to a file under tests/."""
    cited = []
    for text, path in re.findall(r"\[([^\]]*)\]\((tests/[\w/]+\.py)\)", markdown):
        cited += [(name, path) for name in re.findall(r"\btest_\w+", text) if name != Path(path).stem]
    return cited


def test_every_test_the_readme_cites_exists_in_the_file_it_links():
    cited = cited_tests((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(cited) >= 40  # the README cites its evidence; a parser that finds nothing would pass vacuously
    missing = [(name, path) for name, path in cited
               if not (ROOT / path).is_file()
               or not re.search(rf"^\s*(async )?def {name}\(", (ROOT / path).read_text(), re.MULTILINE)]
    assert not missing, f"README cites tests that do not exist where it links: {missing}"


def test_the_citation_parser_reads_lists_and_skips_links_to_a_whole_file():
    text = "see [`test_a`, `test_b`](tests/test_x.py) and [`tests/test_y.py`](tests/test_y.py)"
    assert cited_tests(text) == [("test_a", "tests/test_x.py"), ("test_b", "tests/test_x.py")]
