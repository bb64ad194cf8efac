"""The prompt format: a document and an instruction inside the backbone's chat template.

Specified in docs/PROTOCOL.md §4 ("The prompt"), so that any client rebuilds it
exactly: the document comes first, then the instruction, inside the backbone's
chat template, so that one prefill of the document can serve several
instructions. The plugin's prompt uses a generic instruction; the
personalization is the plugin's job.

Lengths are estimated as 4 characters per token, so that a device without a
tokenizer (the phone, the Java client) builds exactly the same prompt as
training and evaluation.
"""

GENERIC_INSTRUCTION = "Summarize this paper in one sentence."


def approx_tokens(text: str) -> int:
    """Token estimate without a tokenizer: 4 characters per token."""
    return (len(text) + 3) // 4


def plain_document(text: str, max_doc_tokens: int) -> str:
    """Any text as a document: whitespace runs collapsed to one space (str.split),
    then cut at a word boundary to at most 4 * `max_doc_tokens` characters."""
    text = " ".join(text.split())
    limit = 4 * max_doc_tokens
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > 0 else limit]


def chat_template(tokenizer) -> str:
    """The backbone's chat prompt with `{document}` and `{instruction}` placeholders."""
    messages = [{"role": "user", "content": "{document}\n\n{instruction}"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def format_prompt(template: str, document: str, instruction: str) -> str:
    # str.replace, not str.format: documents contain braces. The document goes
    # in last so that text inside it is never taken for a placeholder.
    return template.replace("{instruction}", instruction).replace("{document}", document)
