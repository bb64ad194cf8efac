"""A person's own (document, summary) examples, read from a file (`spa train --examples`, `spa eval --examples`).

Formats, chosen by the file's suffix (`.jsonl`/`.json`: JSON Lines; `.csv`; `.tsv`; any
other suffix: JSON Lines when the first character is `{`, else CSV or TSV by the header):

* JSON Lines: one object per line with the text fields `document` and `summary`
  (other fields are ignored; blank lines are skipped);
* CSV / TSV: a header row naming the columns `document` and `summary` (others ignored).

Plain text in any domain. Anything wrong is one `DataError` line naming the file,
the line (JSON Lines) or row (CSV/TSV) and what is wrong, and nothing is trained:
a file that is not UTF-8, a line that is not a JSON object, a missing or empty field,
a pair that repeats an earlier one, fewer than `MIN_EXAMPLES` examples.

Documents are cut to the plugin's budget exactly as `spa summarize` cuts a text
file (`plain_document`: whitespace collapsed, cut at a word boundary to 4
characters per token), so the plugin trains on what it will read; `ExampleSet.note`
says how many were cut. Summaries are the targets and are kept whole (whitespace
collapsed). The file's SHA-256 identifies it in a plugin's config; the text never
goes there.
"""

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from spa.data.prompts import plain_document
from spa.errors import DataError

MIN_EXAMPLES = 5
FIELDS = ("document", "summary")
# The instruction a plugin trained on examples (and its baselines) uses: examples come from any
# domain, so it names no kind of document; the personal style is the plugin's job.
EXAMPLES_INSTRUCTION = "Summarize this text."


@dataclass(frozen=True)
class Example:
    document: str  # as the prompt holds it: cut to the budget
    summary: str
    where: str  # "line 3" / "row 2": where it is in the file, for messages
    document_chars: int  # characters of the document in the file (whitespace collapsed)


@dataclass(frozen=True)
class ExampleSet:
    path: Path
    examples: list[Example]
    sha256: str  # of the file's bytes
    max_doc_tokens: int

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def cut(self) -> list[Example]:
        return [e for e in self.examples if len(e.document) < e.document_chars]

    def note(self) -> str | None:
        """One line on the documents cut to the budget, or None when every document fits."""
        cut = self.cut
        if not cut:
            return None
        longest = max(e.document_chars for e in cut)
        return (f"{self.path}: {len(cut)} of {len(self)} documents cut to the {self.max_doc_tokens}-token budget "
                f"(about {4 * self.max_doc_tokens:,} characters; the longest had {longest:,}; "
                f"first at {cut[0].where}); --max-doc-tokens sets another budget")

    def record(self) -> dict:
        """What a plugin's config says about its examples: how many, the file's hash; never their text."""
        return {"count": len(self), "sha256": self.sha256, "documents_cut": len(self.cut)}


def read_examples(path, max_doc_tokens: int, minimum: int = MIN_EXAMPLES) -> ExampleSet:
    """The examples of a JSON Lines, CSV or TSV file, or a one-line DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    raw = path.read_bytes()
    text = decode_utf8(path, raw)
    kind = file_kind(path, text)
    pairs = json_lines(path, text) if kind == "jsonl" else table_rows(path, text, "\t" if kind == "tsv" else ",")
    examples, seen = [], {}
    for where, document, summary in pairs:
        document, summary = " ".join(document.split()), " ".join(summary.split())
        if (document, summary) in seen:
            raise DataError(f"{path}: {where} repeats the pair at {seen[document, summary]} (same document and summary)")
        seen[document, summary] = where
        examples.append(Example(plain_document(document, max_doc_tokens), summary, where, len(document)))
    if len(examples) < minimum:
        raise DataError(f"{path}: {len(examples)} example{'s' * (len(examples) != 1)}; at least {minimum} "
                        f"(document, summary) pairs are needed")
    return ExampleSet(path, examples, hashlib.sha256(raw).hexdigest(), max_doc_tokens)


def decode_utf8(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # a byte-order mark, as spreadsheet programs write, is not text
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                        f"{exc.start}); save the file as UTF-8") from None


def file_kind(path: Path, text: str) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return suffix[1:]
    first = text.lstrip()[:1]
    if first == "{":
        return "jsonl"
    header = text.split("\n", 1)[0]
    return "tsv" if "\t" in header else "csv"


def json_lines(path: Path, text: str):
    """(where, document, summary) per non-blank line."""
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}: {where} is not JSON ({exc}); each line must be one object such as "
                            f'{{"document": "...", "summary": "..."}}') from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: {where} is a JSON {type(row).__name__}, not an object with \"document\" and "
                            f"\"summary\"")
        yield where, *fields_of(path, where, row)


def table_rows(path: Path, text: str, delimiter: str):
    """(where, document, summary) per data row of a CSV/TSV file with a header."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = reader.fieldnames or []
    except csv.Error as exc:
        raise DataError(f"{path}: line 1 is not a {kind} header ({exc})") from None
    columns = [c.strip().lower() if c else c for c in header]
    missing = [f for f in FIELDS if f not in columns]
    if missing:
        raise DataError(f"{path}: the {kind} header (line 1) has no {' or '.join(repr(f) for f in missing)} column "
                        f"(columns: {', '.join(repr(c) for c in header) or 'none'})")
    index = {f: header[columns.index(f)] for f in FIELDS}
    number = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataError(f"{path}: row {number + 1} (line {reader.line_num}) is not valid {kind} ({exc})") from None
        number += 1
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue  # a blank row
        where = f"row {number} (line {reader.line_num})"
        yield where, *fields_of(path, where, {f: row.get(index[f]) for f in FIELDS})


def fields_of(path: Path, where: str, row: dict) -> tuple[str, str]:
    values = []
    for name in FIELDS:
        value = row.get(name)
        if value is None:
            raise DataError(f"{path}: {where} has no \"{name}\" field")
        if not isinstance(value, str):
            raise DataError(f"{path}: {where}: \"{name}\" must be text, not {type(value).__name__}")
        if not value.strip():
            raise DataError(f"{path}: {where}: \"{name}\" is empty")
        values.append(value)
    return values[0], values[1]
