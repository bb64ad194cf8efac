"""Protocol error codes and the websocket close code each one maps to.

A `ProtocolError` means "this side must send an `error` message with this code
and close the connection with `close_code`". A `PeerError` means the *other*
side sent an `error` message: it is reported to the user, never echoed back.
"""

from spa.errors import SpaError

# code -> (websocket close code, meaning). 1000-1015 are RFC 6455 codes;
# 4000-4999 are reserved for applications. docs/PROTOCOL.md §7 copies this table.
CODES = {
    "bad_frame": (4000, "not one zstd frame holding one msgpack map"),
    "too_large": (1009, "a frame or its decompressed payload exceeds a limit"),
    "unknown_type": (4001, "the type field names no message this side receives"),
    "bad_field": (4002, "a field is missing, of the wrong type or out of range"),
    "out_of_order": (4003, "a valid message that the session state does not allow now"),
    "unauthorized": (1008, "missing or wrong auth token"),
    "version": (4004, "unsupported protocol version"),
    "backbone_mismatch": (4005, "the plugin was trained for another backbone"),
    "limit": (4006, "a request exceeds a gateway limit (prompt, tokens, window)"),
    "busy": (1013, "the gateway already serves max_sessions sessions; retry later"),
    "idle_timeout": (4007, "no message within idle_timeout_s"),
    "resume_failed": (4008, "the session to resume is unknown, expired, not yours, or out of step"),
    "slow_reader": (4009, "the device did not read what the gateway sent within send_timeout_s"),
    "internal": (1011, "a bug or an unexpected failure on the sending side"),
}

NORMAL_CLOSE = 1000  # after `end`, or on `bye`


class ProtocolError(SpaError):
    """A protocol violation detected on this side; `code` is a key of `CODES`."""

    def __init__(self, code: str, message: str):
        if code not in CODES:
            raise ValueError(f"unknown protocol error code {code!r}")
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def close_code(self) -> int:
        return CODES[self.code][0]


class PeerError(SpaError):
    """The other side sent an `error` message (its code may be one we do not know)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"peer reported {code}: {message}")
        self.code = code
        self.message = message
