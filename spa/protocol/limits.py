"""Gateway limits: one place for their names and defaults (docs/PROTOCOL.md §8).

The gateway echoes them in `ready` so a client can size its frames. Both sides
use the same frame limits by default; the gateway's are the ones that count.
"""

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Limits:
    # Largest compressed websocket message, in bytes (also the websockets
    # `max_size`). Taps of all 31 SmolLM2 layers in f32 are ~72 KB.
    max_frame_bytes: int = 2 << 20
    # Largest decompressed msgpack payload, in bytes: caps what one frame can
    # make the receiver allocate (zstd bombs).
    max_message_bytes: int = 8 << 20
    # Longest prompt after tokenization; SmolLM2's context is 8192 tokens.
    max_prompt_tokens: int = 4096
    # Largest `max_new_tokens` a session may ask for.
    max_new_tokens: int = 2048
    # Largest draft-ahead window W a session may ask for.
    max_window: int = 64
    # Most summary tokens (EOS included) one `teach` may ask states for: the states of a
    # token are ~19 KB with all 31 SmolLM2 taps in int8, so this bounds what one request
    # makes the gateway compute, hold and send (PROTOCOL.md §6, "Teaching").
    max_teach_tokens: int = 512
    # Concurrent sessions per gateway; one more is refused with `busy`.
    max_sessions: int = 8
    # Seconds without any message from the device before the gateway closes
    # the session with `idle_timeout`.
    idle_timeout_s: float = 120.0
    # Seconds a session outlives a connection lost mid-generation (no close
    # frame from the device): the device may resume it within this time
    # (`hello.resume`); 0 turns resumption off.
    resume_grace_s: float = 30.0
    # Seconds one outgoing message may wait for the device to read (TCP and
    # websocket buffers full) before the gateway drops the connection as a
    # `slow_reader`; the session then waits for a resume like any lost link.
    send_timeout_s: float = 30.0

    def to_dict(self) -> dict:
        return asdict(self)
