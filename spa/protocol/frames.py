"""Frames: one websocket binary message = one msgpack map, zstd-compressed or not (negotiated).

Each connection owns one `FrameCodec` (one zstd compressor and decompressor,
reused for every message). Every message is compressed as its own complete
zstd frame, with the content size in its header, so frames never depend on
each other and a Java peer can decode them with a one-shot call.

Frame compression is negotiated per connection (PROTOCOL.md §2): `hello`
offers a list (`compression`, e.g. ``["zstd", "none"]``; absent means
``["zstd"]``), `ready`/`resumed` names the gateway's choice, and from then on
every frame in both directions has that form. The two forms are told apart by
their first bytes: a zstd frame starts with the magic 28 B5 2F FD, which no
msgpack map does. Before the choice a codec made with ``compression=None``
reads either form and writes `write` (default zstd; a gateway switches to
`none` with `answer_in` when the hello itself came uncompressed).
"""

import msgpack
import zstandard

from spa.protocol.errors import ProtocolError
from spa.protocol.limits import Limits

_DEFAULTS = Limits()
COMPRESSIONS = ("zstd", "none")  # the frame forms this implementation reads and writes, preferred first
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def negotiate(offer) -> str:
    """The gateway's choice for a hello's `compression` offer (None: an old device, zstd)."""
    for form in ("zstd",) if offer is None else offer:
        if form in COMPRESSIONS:
            return form
    raise ProtocolError("bad_field", f"hello.compression: none of {list(offer)} is supported (only {list(COMPRESSIONS)})")


def frame_form(data: bytes) -> str:
    """ "zstd" or "none", from a frame's first bytes."""
    return "zstd" if bytes(data[:4]) == ZSTD_MAGIC else "none"


class FrameCodec:
    def __init__(
        self,
        # Largest compressed frame accepted by `unpack`, in bytes.
        max_frame_bytes: int = _DEFAULTS.max_frame_bytes,
        # Largest decompressed payload accepted by `unpack`, in bytes; the
        # decompressor never allocates more than this.
        max_message_bytes: int = _DEFAULTS.max_message_bytes,
        # Longest msgpack array (taps lists, shapes); a header may not claim more.
        max_array_len: int = 4096,
        # Most keys in one msgpack map.
        max_map_len: int = 256,
        # zstd level for `pack`; 3 is zstd's default, fast enough per token.
        level: int = 3,
        # The connection's frame form ("zstd" or "none"); None: not negotiated yet (read both).
        compression: str | None = "zstd",
        # The form `pack` writes while `compression` is None (default zstd; see answer_in).
        write: str | None = None,
    ):
        for form in (compression, write):
            if form is not None and form not in COMPRESSIONS:
                raise ValueError(f"unknown frame compression {form!r}")
        self.compression = compression
        self._write = write
        self.first_form: str | None = None  # the form of the first good frame read
        self.max_frame_bytes = max_frame_bytes
        self.max_message_bytes = max_message_bytes
        self._unpack_limits = dict(
            max_bin_len=max_message_bytes,
            max_str_len=max_message_bytes,
            max_array_len=max_array_len,
            max_map_len=max_map_len,
            max_ext_len=0,  # the protocol uses no msgpack extension types
        )
        self._compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
        self._decompressor = zstandard.ZstdDecompressor()

    def negotiated(self, compression: str) -> None:
        """From now on every frame, read or written, has this form."""
        if compression not in COMPRESSIONS:
            raise ProtocolError("bad_field", f"compression {compression!r} is not one of {list(COMPRESSIONS)}")
        self.compression = self._write = compression

    @property
    def writes(self) -> str:
        """The form `pack` uses now."""
        return self.compression or self._write or "zstd"

    def pack(self, msg: dict) -> bytes:
        """zstd(msgpack(msg)), or msgpack(msg) on an uncompressed connection; bytes values become
        msgpack bin, str become str."""
        payload = msgpack.packb(msg, use_bin_type=True)
        return payload if self.writes == "none" else self._compressor.compress(payload)

    def unpack(self, data: bytes) -> dict:
        """The map inside one frame; any defect raises ProtocolError."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError("bad_frame", "expected a binary frame")
        if len(data) > self.max_frame_bytes:
            raise ProtocolError("too_large", f"frame of {len(data)} bytes > {self.max_frame_bytes}")
        data = bytes(data)
        form = frame_form(data)
        if self.compression is not None and form != self.compression:
            raise ProtocolError("bad_frame", f"a {'zstd' if form == 'zstd' else 'not zstd-compressed'} frame on a "
                                             f"connection that negotiated compression {self.compression!r}")
        payload = self._decompress(data) if form == "zstd" else data
        try:
            msg = msgpack.unpackb(payload, raw=False, strict_map_key=True, **self._unpack_limits)
        except ValueError as e:  # every msgpack unpack error derives from ValueError
            raise ProtocolError("bad_frame", f"bad msgpack: {_reason(e)}") from None
        if not isinstance(msg, dict):
            raise ProtocolError("bad_frame", f"expected a msgpack map, got {type(msg).__name__}")
        if self.first_form is None:
            self.first_form = form
        return msg

    def answer_in(self, form: str) -> None:
        """Before the choice, write this form (a gateway answers an uncompressed hello uncompressed)."""
        if self.compression is None:
            self._write = form

    def _decompress(self, data: bytes) -> bytes:
        # `ZstdDecompressor.decompress` ignores `max_output_size` when the frame
        # header states a content size and allocates that size, whatever it
        # is. So read the header first and refuse a size over the limit; the
        # decompressor then fails if the data would outgrow the stated size.
        try:
            size = zstandard.get_frame_parameters(data).content_size
        except zstandard.ZstdError as e:
            raise ProtocolError("bad_frame", f"bad zstd frame header: {e}") from None
        if size == zstandard.CONTENTSIZE_UNKNOWN:
            raise ProtocolError("bad_frame", "zstd frame header must state the content size")
        if size > self.max_message_bytes:
            raise ProtocolError("too_large", f"payload of {size} bytes > {self.max_message_bytes}")
        try:
            return self._decompressor.decompress(
                data, max_output_size=self.max_message_bytes, allow_extra_data=False
            )
        except zstandard.ZstdError as e:
            raise ProtocolError("bad_frame", f"bad zstd frame: {e}") from None


def _reason(e: ValueError) -> str:
    """A readable reason for a msgpack error; some (FormatError, StackError) carry no text."""
    if str(e):
        return str(e)
    if isinstance(e, msgpack.exceptions.FormatError):
        return "a byte that starts no msgpack value (e.g. 0xc1, which msgpack never uses)"
    if isinstance(e, msgpack.exceptions.StackError):
        return "values nested too deeply"
    return type(e).__name__
