"""Where `spa summarize` gets its document, and the prompt the device builds from it."""

import sys
from pathlib import Path

from spa.data import document_text, format_prompt, load_split, plain_document
from spa.errors import DataError


def load_document(spec: str, max_doc_tokens: int) -> str:
    """`aclsum:SPLIT:INDEX` (an ACLSum paper), `-` (standard input) or a text file path."""
    if spec.startswith("aclsum:"):
        try:
            _, split, index = spec.split(":")
            papers = load_split(split)
            return document_text(papers[int(index)], max_doc_tokens)
        except (ValueError, IndexError):
            raise DataError(f"{spec!r}: expected aclsum:SPLIT:INDEX with SPLIT train/val/test and a valid index") from None
    if spec == "-":
        text = sys.stdin.read()
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"document {spec!r} is not a file (use a path, '-' for stdin, or aclsum:test:0)")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise DataError(f"document {spec!r} is not UTF-8 text") from None
    if not text.strip():
        raise DataError(f"document {spec!r} is empty")
    return plain_document(text, max_doc_tokens)


def device_prompt(config, document: str) -> str:
    """The prompt exactly as the plugin was trained with (its template and instruction)."""
    return format_prompt(config.prompt_template, document, config.instruction)
