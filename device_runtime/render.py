"""Show a summary as it is committed, with the side network's tokens highlighted (paper Fig. 4)."""

import codecs
import sys

_ANSI_ON, _ANSI_OFF = "\x1b[1;30;43m", "\x1b[0m"  # bold on yellow
_BRACKETS = ("[", "]")


class StreamPrinter:
    """`on_commit(piece, sigma)` callback printing committed text immediately.

    highlight: "ansi" (colour, for terminals), "brackets" ([side-chosen] tokens, for logs)
    or "none".
    """

    def __init__(self, out=sys.stdout, highlight: str = "ansi"):
        self.out = out
        self.highlight = highlight
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, piece: bytes, sigma: int) -> None:
        text = self._utf8.decode(piece)
        if sigma and text and self.highlight != "none":
            on, off = (_ANSI_ON, _ANSI_OFF) if self.highlight == "ansi" else _BRACKETS
            lead = len(text) - len(text.lstrip())  # keep the leading space outside the mark
            text = text[:lead] + on + text[lead:] + off
        self.out.write(text)
        self.out.flush()

    def finish(self) -> None:
        self.out.write(self._utf8.decode(b"", final=True) + "\n")


def format_stats(stats: dict) -> str:
    tps = f"{stats['tokens_per_s']:.1f} tokens/s" if stats["tokens_per_s"] else "- tokens/s"
    return "\n".join([
        f"--- {stats['tokens']} tokens; side network used on {stats['side_tokens']} ({stats['side_usage']:.0%}) "
        f"at tau {stats['tau']:.3g}; {stats['rollbacks']} rollbacks (W = {stats['window']})",
        f"    bytes per token: {stats['bytes_down_per_token']:.0f} down, {stats['bytes_up_per_token']:.0f} up "
        f"({stats['codec']}{'; cloud-side projection' if stats.get('cloud_projection') else ''}; "
        f"handshake {stats['handshake_bytes_up']} up) | "
        f"round trips per token: {stats['round_trips_per_token']:.2f}"
        + (f" ({stats['pushed_taps_used']} side tokens from pushed taps)" if stats.get("push_taps") else ""),
        f"    time to first token {stats['ttft_s']:.2f} s | {tps} | {stats['wall_s']:.2f} s in all",
    ])
