"""Frames: one websocket binary message = one zstd frame of one msgpack map.

Each connection owns one `FrameCodec` (one zstd compressor and decompressor,
reused for every message). Every message is compressed as its own complete
zstd frame, with the content size in its header, so frames never depend on
each other and a Java peer can decode them with a one-shot call.
"""

import msgpack
import zstandard

from spa.protocol.errors import ProtocolError
from spa.protocol.limits import Limits

_DEFAULTS = Limits()


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
    ):
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

    def pack(self, msg: dict) -> bytes:
        """zstd(msgpack(msg)); bytes values become msgpack bin, str become str."""
        return self._compressor.compress(msgpack.packb(msg, use_bin_type=True))

    def unpack(self, data: bytes) -> dict:
        """The map inside one frame; any defect raises ProtocolError."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ProtocolError("bad_frame", "expected a binary frame")
        if len(data) > self.max_frame_bytes:
            raise ProtocolError("too_large", f"frame of {len(data)} bytes > {self.max_frame_bytes}")
        payload = self._decompress(bytes(data))
        try:
            msg = msgpack.unpackb(payload, raw=False, strict_map_key=True, **self._unpack_limits)
        except ValueError as e:  # every msgpack unpack error derives from ValueError
            raise ProtocolError("bad_frame", f"bad msgpack: {_reason(e)}") from None
        if not isinstance(msg, dict):
            raise ProtocolError("bad_frame", f"expected a msgpack map, got {type(msg).__name__}")
        return msg

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
