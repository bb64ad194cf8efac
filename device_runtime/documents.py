"""Where `spa summarize` gets its document, and the prompt the device builds from it.

The construction is specified in docs/PROTOCOL.md §4 ("The prompt"). A
document longer than the budget is cut; `read_document` says so (`note`), so
that the user learns what the plugin actually read.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

from spa.data.aclsum import document_text, kept_sentences, load_split, sentence_count
from spa.data.prompts import format_prompt, plain_document
from spa.errors import DataError
from spa.protocol.limits import Limits

# The largest document budget a user may ask for: the gateway's default prompt
# limit (a prompt holds the document plus the template and instruction).
MAX_DOC_TOKENS = Limits().max_prompt_tokens


@dataclass(frozen=True)
class Document:
    text: str  # what goes into the prompt
    source_chars: int  # characters of the whole source: the file, or the paper with every sentence
    kept: int  # words (plain text) or sentences (ACLSum) kept ...
    total: int  # ... of this many
    unit: str  # "words" or "sentences"
    cut: bool
    max_doc_tokens: int

    def note(self) -> str | None:
        """One line on what was kept, or None when the whole document fits."""
        if not self.cut:
            return None
        what = (f"the first {self.kept:,} of {self.total:,} words" if self.unit == "words" else
                f"the title and {self.kept:,} of {self.total:,} sentences, abstract first")
        return (f"document cut to {len(self.text):,} of {self.source_chars:,} characters: {what} "
                f"(--max-doc-tokens {self.max_doc_tokens}; at most {MAX_DOC_TOKENS:,})")


def check_doc_tokens(max_doc_tokens) -> int:
    """A document budget a user asked for: an int in [1, MAX_DOC_TOKENS]."""
    if type(max_doc_tokens) is not int or not 1 <= max_doc_tokens <= MAX_DOC_TOKENS:
        raise DataError(f"--max-doc-tokens must be between 1 and {MAX_DOC_TOKENS} (the gateway's default "
                        f"prompt limit, max_prompt_tokens), got {max_doc_tokens}")
    return max_doc_tokens


def read_document(spec: str, max_doc_tokens: int) -> Document:
    """`aclsum:SPLIT:INDEX` (an ACLSum paper), `-` (standard input) or a text file path,
    as a document of about `max_doc_tokens` tokens."""
    if spec.startswith("aclsum:"):
        try:
            _, split, index = spec.split(":")
            papers = load_split(split)
            paper = papers[int(index)]
        except (ValueError, IndexError):
            raise DataError(f"{spec!r}: expected aclsum:SPLIT:INDEX with SPLIT train/val/test and a valid index") from None
        text, total = document_text(paper, max_doc_tokens), sentence_count(paper)
        kept = len(kept_sentences(paper, max_doc_tokens))
        whole = document_text(paper, 1 << 62)
        return Document(text, len(whole), kept, total, "sentences", kept < total, max_doc_tokens)
    if spec == "-":
        raw = sys.stdin.read()
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"document {spec!r} is not a file (use a path, '-' for stdin, or aclsum:test:0)")
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"document {spec!r} is not UTF-8 text") from None
    if not raw.strip():
        raise DataError(f"document {spec!r} is empty")
    text, words = plain_document(raw, max_doc_tokens), raw.split()
    return Document(text, len(raw), len(text.split()), len(words), "words", len(text) < len(" ".join(words)),
                    max_doc_tokens)


def load_document(spec: str, max_doc_tokens: int) -> str:
    """The document's text (see `read_document`)."""
    return read_document(spec, max_doc_tokens).text


def device_prompt(config, document: str) -> str:
    """The prompt exactly as the plugin was trained with (its template and instruction)."""
    return format_prompt(config.prompt_template, document, config.instruction)
