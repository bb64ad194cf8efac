"""Stand-ins for people with examples files, built from public data installed from PyPI (the learning curve).

* `challenge`, `approach`, `outcome`: ACLSum's three reader types (`aclsum==0.1.2`).
  The examples are the train split's papers in file order (the whole text: title,
  abstract, introduction, conclusion; the examples reader cuts it to the budget),
  each with that aspect's human summary; the test documents are the test split's.
* `quotes`: a reader of the news who wants to hear what people said: the summary is
  the article's first sentence with a direct quotation, verbatim. Articles are
  gensim's bundled `test/test_data/lee_background.cor` (`pip install --no-deps
  gensim==4.4.0`; 300 Australian news articles, one per line; only the file is
  read, gensim is never imported). 197 articles quote someone; kept are those
  whose first quoted sentence ends within the document budget of the curve
  (`CURVE_DOC_TOKENS`, 768 characters: 140 articles), so that the document the
  plugin reads holds it. In file order, the first 100 are the examples, the rest
  the test documents (the file repeats 4 articles: each is kept once, so the
  examples are 97). No ACLSum aspect asks for that, nor does the generic
  instruction.

Each person becomes JSON Lines files exactly as a person would write them:
`<person>.jsonl` (100 examples; the first n of it are the n-example file) and
`<person>-test.jsonl`.
"""

import json
import re
from pathlib import Path

from spa.data.aclsum import PROFILES, document_text, load_split
from spa.errors import DataError
from spa.system.paths import package_dir

PEOPLE = (*PROFILES, "quotes")
EXAMPLES = 100
CURVE_DOC_TOKENS = 192  # the learning curve's document budget (evaluation/curve.py)
LEE_FILE = ("test", "test_data", "lee_background.cor")
# A sentence ends at . ! or ? (perhaps inside a closing quote) followed by a space and a capital or a quote.
_SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]"))\s+(?=["A-Z])')


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def first_quote(article: str) -> str | None:
    """The article's first sentence holding a direct quotation ("..."), or None."""
    return next((s for s in sentences(article) if s.count('"') >= 2 or s.startswith('"')), None)


def quote_pairs(within_chars: int = 4 * CURVE_DOC_TOKENS) -> list[dict]:
    """(article, its first quoted sentence) for the articles where that sentence ends within `within_chars`."""
    path = package_dir("gensim").joinpath(*LEE_FILE)
    if not path.exists():
        raise DataError(f"{path} is missing; pip install --no-deps gensim==4.4.0")
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        article = " ".join(line.split())
        quote = first_quote(article) if article else None
        if quote and article.find(quote) + len(quote) <= within_chars:
            pairs.append({"document": article, "summary": quote})
    return pairs


def person_pairs(person: str) -> tuple[list[dict], list[dict]]:
    """(up to EXAMPLES training pairs, the test pairs) of one person."""
    if person == "quotes":
        # The file holds a few articles twice (4 of the 140): each is kept once, so that no example
        # file repeats a pair and no test document is an example.
        pairs = quote_pairs()
        train = distinct(pairs[:EXAMPLES])
        known = {p["document"] for p in train}
        return train, [p for p in distinct(pairs[EXAMPLES:]) if p["document"] not in known]
    if person not in PROFILES:
        raise DataError(f"unknown person {person!r}; choose from {', '.join(PEOPLE)}")
    def pairs(split):
        return [{"document": document_text(p, 1 << 62), "summary": p.summaries[person]} for p in load_split(split)]
    return pairs("train")[:EXAMPLES], pairs("test")


def distinct(pairs: list[dict]) -> list[dict]:
    """The pairs with each document once (its first pair), in order."""
    seen, out = set(), []
    for pair in pairs:
        if pair["document"] not in seen:
            seen.add(pair["document"])
            out.append(pair)
    return out


def write_person(person: str, folder: Path, sizes, tests: int) -> tuple[dict[int, Path], Path]:
    """Write the person's files: ({n: the first-n examples file}, the test file of its first `tests` pairs);
    a size above the person's examples becomes all of them."""
    folder.mkdir(parents=True, exist_ok=True)
    train, test = person_pairs(person)
    files = {}
    for n in dict.fromkeys(min(n, len(train)) for n in sizes):  # a person with fewer examples: all of them
        files[n] = folder / f"{person}-{n}.jsonl"
        write_jsonl(files[n], train[:n])
    test_file = folder / f"{person}-test.jsonl"
    write_jsonl(test_file, test[:tests])
    return files, test_file


def write_jsonl(path: Path, pairs: list[dict]) -> None:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
