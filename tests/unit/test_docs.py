"""The documentation the code cites is in the repository, and nothing points outside it.

Code and docs cite the design document as "docs/DESIGN.md section N" (or N.M); every such
citation must name a numbered heading of docs/DESIGN.md. A user of the repository has no
files beside it, so no shipped file may point at ``../shared`` or ``shared/DESIGN``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DESIGN = REPO / "docs" / "DESIGN.md"
SCANNED = ("spin_ray", "jobs", "bench", "docs", "README.md")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".yaml", ".yml", ".toml", ".json", ".sh", ".cfg", ".ini", ".rst"}
FORBIDDEN = ("../shared", "shared/DESIGN")

CITATION = re.compile(r"docs/DESIGN\.md,?(?:\s|#)+sections?(?:\s|#)+(\d+(?:\.\d+)*)")
"""A citation; the number may follow a line break inside a docstring or a comment."""
ANY_MENTION = re.compile(r"(?<![\w/.-])(?:[\w.-]+/)*DESIGN\.md")
HEADING = re.compile(r"^#{2,4}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def scanned_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = REPO / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [f for f in candidates
                  if f.is_file() and f.suffix in TEXT_SUFFIXES and "__pycache__" not in f.parts]
    return files


def design_sections(text: str) -> set[str]:
    return set(HEADING.findall(text))


def citations(text: str) -> list[str]:
    return CITATION.findall(text)


def test_design_document_exists_with_numbered_sections():
    assert DESIGN.is_file(), "docs/DESIGN.md is missing: the code cites it"
    sections = design_sections(DESIGN.read_text(encoding="utf-8"))
    assert {"1", "2", "3", "4", "5", "6", "7", "8"} <= sections, sorted(sections)


def test_every_design_citation_names_an_existing_section():
    sections = design_sections(DESIGN.read_text(encoding="utf-8"))
    cited, missing = 0, []
    for path in scanned_files():
        for number in citations(path.read_text(encoding="utf-8", errors="replace")):
            cited += 1
            if number not in sections:
                missing.append(f"{path.relative_to(REPO)}: docs/DESIGN.md section {number}")
    assert cited, "no citation of docs/DESIGN.md found: is the scan still looking at the right files?"
    assert not missing, "citations of sections that docs/DESIGN.md does not have:\n" + "\n".join(missing)


def test_design_is_cited_by_its_path_in_the_repository():
    """"DESIGN.md section 3" without the folder, or "../DESIGN.md", leaves a reader guessing."""
    wrong = []
    for path in scanned_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in ANY_MENTION.finditer(text):
            mention = match.group(0)
            in_docs_link = path.parent == DESIGN.parent and text[max(0, match.start() - 2):match.start()] == "]("
            if mention != "docs/DESIGN.md" and not (in_docs_link and mention == "DESIGN.md"):
                line = text.count("\n", 0, match.start()) + 1
                wrong.append(f"{path.relative_to(REPO)}:{line}: {mention}")
    assert not wrong, "cite the design document as docs/DESIGN.md:\n" + "\n".join(wrong)


def test_nothing_points_outside_the_repository():
    hits = []
    for path in scanned_files():
        for line_number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            hits += [f"{path.relative_to(REPO)}:{line_number}: {word}" for word in FORBIDDEN if word in line]
    assert not hits, "users of the repository have no ../shared; write it into docs/ instead:\n" + "\n".join(hits)


@pytest.mark.parametrize("text, expected", [
    ("see docs/DESIGN.md section 4.", ["4"]),
    ("(docs/DESIGN.md section 3.2: seeds", ["3.2"]),
    ("stream (docs/DESIGN.md\n    section 5), so", ["5"]),
    ("# comment docs/DESIGN.md\n# section 7", ["7"]),
    ("docs/DESIGN.md, section 6", ["6"]),
    ("DESIGN.md section 3", []),
])
def test_citation_pattern(text, expected):
    assert citations(text) == expected


def test_headings_are_read_with_and_without_a_trailing_dot():
    text = "# Design\n## 1. What\n### 3.2 Why\n## Notes\n"
    assert design_sections(text) == {"1", "3.2"}


def test_a_missing_section_or_a_bare_mention_would_be_caught():
    assert "9" not in design_sections(DESIGN.read_text(encoding="utf-8"))
    assert [m.group(0) for m in ANY_MENTION.finditer("see DESIGN.md and ../shared/DESIGN.md and docs/DESIGN.md")] \
        == ["DESIGN.md", "../shared/DESIGN.md", "docs/DESIGN.md"]
