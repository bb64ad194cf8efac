"""Protocol error codes and the websocket close code each one maps to.

A `ProtocolError` means "this side must send an `error` message with this code
and close the connection with `close_code`". A `PeerError` means the *other*
side sent an `error` message: it is reported to the user, never echoed back.
"""

from spa.errors import SpaError
from spa.protocol.schema import schema

# code -> (websocket close code, meaning), from the protocol's schema (spa/protocol/schema.json,
# docs/PROTOCOL.md §7). 1000-1015 are RFC 6455 codes; 4000-4999 are reserved for applications.
CODES = {e["code"]: (e["close"], e["meaning"]) for e in schema()["errors"]}

NORMAL_CLOSE = schema()["normal_close"]  # after `end`, or on `bye`


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
