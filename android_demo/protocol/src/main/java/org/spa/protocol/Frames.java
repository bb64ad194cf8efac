package org.spa.protocol;

import java.util.Map;

import com.github.luben.zstd.ZstdCompressCtx;
import com.github.luben.zstd.ZstdDecompressCtx;
import com.github.luben.zstd.ZstdException;

/**
 * One websocket binary message = one zstd frame (content size in its header) =
 * one msgpack map (docs/PROTOCOL.md section 2; reference spa/protocol/frames.py).
 *
 * One instance per connection: it owns one zstd compressor and one
 * decompressor, reused for every message. Each message is still its own
 * complete frame, so any frame decodes without the others. Not thread-safe.
 */
public final class Frames implements AutoCloseable {
    public final int maxFrameBytes;
    public final int maxMessageBytes;
    private final ZstdCompressCtx compressor = new ZstdCompressCtx();
    private final ZstdDecompressCtx decompressor = new ZstdDecompressCtx();

    public Frames() {
        this(Limits.MAX_FRAME_BYTES, Limits.MAX_MESSAGE_BYTES, 3);
    }

    /** @param level zstd level for {@link #pack}; 3 is zstd's default, fast enough per token. */
    public Frames(int maxFrameBytes, int maxMessageBytes, int level) {
        this.maxFrameBytes = maxFrameBytes;
        this.maxMessageBytes = maxMessageBytes;
        compressor.setLevel(level);
        compressor.setContentSize(true); // the spec requires the size in the header
        compressor.setChecksum(false);
    }

    /** zstd(msgpack(msg)): byte[] values become msgpack bin, String values str. */
    public byte[] pack(Map<String, Object> msg) {
        return compressor.compress(MsgPack.pack(msg));
    }

    /** The map inside one frame; any defect is a ProtocolException (bad_frame or too_large). */
    @SuppressWarnings("unchecked")
    public Map<String, Object> unpack(byte[] data) throws ProtocolException {
        if (data.length > maxFrameBytes) {
            throw new ProtocolException("too_large", "frame of " + data.length + " bytes > " + maxFrameBytes);
        }
        byte[] payload = decompress(data);
        Object msg = MsgPack.unpack(payload, Limits.MAX_ARRAY_LEN, Limits.MAX_MAP_LEN, Limits.MAX_DEPTH);
        if (!(msg instanceof Map)) {
            String kind = msg == null ? "nil" : msg.getClass().getSimpleName();
            throw new ProtocolException("bad_frame", "expected a msgpack map, got " + kind);
        }
        return (Map<String, Object>) msg;
    }

    private byte[] decompress(byte[] data) throws ProtocolException {
        // Read the header first and refuse a stated size over the limit before
        // allocating it; then decompress into exactly that many bytes.
        ZstdFrameHeader header = ZstdFrameHeader.parse(data);
        if (header.contentSize == ZstdFrameHeader.UNKNOWN) {
            throw new ProtocolException("bad_frame", "zstd frame header must state the content size");
        }
        if (header.contentSize > maxMessageBytes) {
            throw new ProtocolException("too_large", "payload of " + header.contentSize + " bytes > " + maxMessageBytes);
        }
        if (header.frameLength != data.length) {
            throw new ProtocolException("bad_frame", (data.length - header.frameLength) + " bytes after the zstd frame");
        }
        int size = (int) header.contentSize;
        byte[] out = new byte[size];
        int n;
        try {
            n = decompressor.decompressByteArray(out, 0, size, data, 0, data.length);
        } catch (ZstdException e) { // corrupt data, or more data than the header stated
            throw new ProtocolException("bad_frame", "bad zstd frame: " + e.getMessage());
        } catch (RuntimeException e) { // older zstd-jni versions throw plain RuntimeExceptions
            throw new ProtocolException("bad_frame", "bad zstd frame: " + e.getMessage());
        }
        if (n != size) throw new ProtocolException("bad_frame", "zstd frame holds " + n + " bytes, header says " + size);
        return out;
    }

    @Override
    public void close() {
        compressor.close();
        decompressor.close();
    }
}
