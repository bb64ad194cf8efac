"""Token id -> the exact bytes it contributes to the text.

The device has no tokenizer: each `step` and `verdict` carries its token's
bytes (`piece`), and the device concatenates them. A byte-level BPE token may
hold part of a UTF-8 character, so pieces are bytes, not strings.
"""


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 byte values (char -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def token_pieces(tokenizer) -> list[bytes]:
    """Bytes of every token id; special tokens (chat markers, EOS) contribute nothing."""
    alphabet = _byte_level_alphabet()
    specials = set(tokenizer.all_special_ids)
    pieces = []
    for i, tok in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if i in specials or tok is None:
            pieces.append(b"")
        elif all(c in alphabet for c in tok):
            pieces.append(bytes(alphabet[c] for c in tok))
        else:  # not a byte-level vocabulary (e.g. SentencePiece): best effort
            pieces.append(tokenizer.convert_tokens_to_string([tok]).encode())
    return pieces
