"""Every reference to a section of the design or the protocol document points at a section that exists.

References look like `docs/DESIGN.md §2`, `PROTOCOL.md §6`, `docs/DESIGN.md §1, §2`,
`docs/PROTOCOL.md section 5` (the Java sources) or `spec §8` (the README's name
for the protocol); inside docs/DESIGN.md and docs/PROTOCOL.md a bare `§N`
means that document's own section N. A design document is named by its file,
`docs/DESIGN.md`: a bare "DESIGN" names nothing a reader can open.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = {"DESIGN": ROOT / "docs" / "DESIGN.md", "PROTOCOL": ROOT / "docs" / "PROTOCOL.md"}
SUFFIXES = {".py", ".md", ".java", ".sh"}
SKIP_DIRS = {".venv", ".git", "build", ".gradle", "node_modules", "__pycache__", ".pytest_cache", ".hypothesis"}

NUMBER = r"\d+(?:\.\d+)*"
# A document name, then one section or a list of them: "§1, §2", "§7, §8 and §9".
REFERENCE = re.compile(
    r"(?:(?:docs/)?(?P<doc>DESIGN|PROTOCOL)(?:\.md)?`?|\b(?P<spec>spec))"
    rf"[\s,]*(?:§ ?|section )(?P<first>{NUMBER})"
    rf"(?P<more>(?:`?\s*(?:,|and|or)\s*(?:§ ?|section ){NUMBER})*)"
)
BARE = re.compile(rf"§ ?({NUMBER})")
HEADING = re.compile(rf"^#{{2,4}} +({NUMBER})\.?(?: |$)", re.M)
UNNAMED_DESIGN = re.compile(r"\bDESIGN\b(?!\.md)")


def source_files() -> list[Path]:
    files = []
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT)
        if path.suffix in SUFFIXES and path.is_file() and not SKIP_DIRS & set(rel.parts[:-1]):
            if path != Path(__file__).resolve():
                files.append(path)
    return sorted(files)


def sections(doc: str) -> set[str]:
    return set(HEADING.findall(DOCS[doc].read_text()))


def references(path: Path) -> list[tuple[int, str, str]]:
    """(line, document, section) for every section reference in a file."""
    text = path.read_text(errors="replace")
    found, taken = [], []
    line_of = lambda pos: text.count("\n", 0, pos) + 1  # noqa: E731
    for match in REFERENCE.finditer(text):
        doc = match["doc"] or "PROTOCOL"
        for number in [match["first"]] + re.findall(NUMBER, match["more"] or ""):
            found.append((line_of(match.start()), doc, number))
        taken.append(match.span())
    own = next((name for name, doc_path in DOCS.items() if doc_path == path), None)
    if own:  # a bare § inside a document is its own section
        for match in BARE.finditer(text):
            if not any(a <= match.start() < b for a, b in taken):
                found.append((line_of(match.start()), own, match[1]))
    return found


def test_the_design_document_exists_with_numbered_sections():
    assert DOCS["DESIGN"].is_file(), "docs/DESIGN.md is missing"
    assert {"1", "2", "3", "4"} <= sections("DESIGN")
    assert {str(n) for n in range(1, 12)} <= sections("PROTOCOL")


def test_every_section_reference_exists():
    known = {doc: sections(doc) for doc in DOCS}
    broken = [f"{path.relative_to(ROOT)}:{line}: {doc} §{number}"
              for path in source_files() for line, doc, number in references(path) if number not in known[doc]]
    assert not broken, "references to sections that do not exist:\n" + "\n".join(broken)


def test_design_references_name_the_file():
    unnamed = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}"
               for path in source_files() for text in [path.read_text(errors="replace")]
               for m in UNNAMED_DESIGN.finditer(text)]
    assert not unnamed, "name the design document docs/DESIGN.md (with a section), not 'DESIGN':\n" + "\n".join(unnamed)


def test_the_reference_scanner_finds_what_it_should(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""See docs/DESIGN.md §1, §2 and `docs/PROTOCOL.md` §6; PROTOCOL.md section 5;\n'
                      'the spec §8 and §7; `docs/PROTOCOL.md §2`, §3; DESIGN.md §9."""\n')
    assert references(sample) == [(1, "DESIGN", "1"), (1, "DESIGN", "2"), (1, "PROTOCOL", "6"), (1, "PROTOCOL", "5"),
                                  (2, "PROTOCOL", "8"), (2, "PROTOCOL", "7"), (2, "PROTOCOL", "2"),
                                  (2, "PROTOCOL", "3"), (2, "DESIGN", "9")]
    assert "9" not in sections("DESIGN")  # so the last one would be reported
