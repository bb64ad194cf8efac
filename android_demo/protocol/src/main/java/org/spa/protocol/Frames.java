package org.spa.protocol;

import java.util.Arrays;
import java.util.Collections;
import java.util.List;
import java.util.Map;

import com.github.luben.zstd.ZstdCompressCtx;
import com.github.luben.zstd.ZstdDecompressCtx;
import com.github.luben.zstd.ZstdException;

/**
 * One websocket binary message = one msgpack map, as one zstd frame (content size in its
 * header) or uncompressed: the form is negotiated per connection (docs/PROTOCOL.md section 2;
 * reference spa/protocol/frames.py). `hello.compression` offers what this device can load
 * ({@link #offer()}: zstd only if zstd-jni's native library loads — the APK built without
 * Gradle has none), `ready.compression` is the gateway's choice, and from then on every frame
 * has that form. The forms are told apart by their first bytes (zstd's magic 28 B5 2F FD).
 *
 * One instance per connection: it owns one zstd compressor and one decompressor, made only
 * when zstd is used (so an uncompressed connection never touches zstd-jni), reused for every
 * message. Each message is still its own complete frame, so any frame decodes without the
 * others. Not thread-safe.
 */
public final class Frames implements AutoCloseable {
    public static final String ZSTD = "zstd", NONE = "none";
    private static final byte[] ZSTD_MAGIC = {0x28, (byte) 0xb5, 0x2f, (byte) 0xfd};
    private static Boolean zstdLoads;

    public final int maxFrameBytes;
    public final int maxMessageBytes;
    private final int level;
    private String compression; // null: not negotiated yet, both forms are read
    private String write; // the form pack writes while compression is null
    private Zstd zstd; // made on first use

    public Frames() {
        this(Limits.MAX_FRAME_BYTES, Limits.MAX_MESSAGE_BYTES, 3);
    }

    /** A zstd connection (as before negotiation existed). @param level zstd level for {@link #pack}; 3 is zstd's default. */
    public Frames(int maxFrameBytes, int maxMessageBytes, int level) {
        this(maxFrameBytes, maxMessageBytes, level, ZSTD, null);
    }

    /**
     * @param compression the connection's form, or null before negotiation (both forms are read)
     * @param write the form {@link #pack} uses while {@code compression} is null (the hello's)
     */
    public Frames(int maxFrameBytes, int maxMessageBytes, int level, String compression, String write) {
        check(compression == null ? ZSTD : compression);
        check(write == null ? ZSTD : write);
        this.maxFrameBytes = maxFrameBytes;
        this.maxMessageBytes = maxMessageBytes;
        this.level = level;
        this.compression = compression;
        this.write = write;
    }

    /** Whether zstd-jni's native library loads here (tried once). */
    public static synchronized boolean zstdAvailable() {
        if (zstdLoads == null) {
            try {
                new Zstd(3).close();
                zstdLoads = true;
            } catch (Throwable t) { // UnsatisfiedLinkError, NoClassDefFoundError: no zstd for this platform
                zstdLoads = false;
            }
        }
        return zstdLoads;
    }

    /** What this device offers in `hello.compression`: zstd first if it loads, and always none. */
    public static List<String> offer() {
        return zstdAvailable() ? Arrays.asList(ZSTD, NONE) : Collections.singletonList(NONE);
    }

    /** From now on every frame, read or written, has this form. */
    public void negotiated(String form) throws ProtocolException {
        if (!ZSTD.equals(form) && !NONE.equals(form)) {
            throw new ProtocolException("bad_field", "compression \"" + form + "\" is not zstd or none");
        }
        compression = form;
        write = form;
    }

    /** The form {@link #pack} writes now. */
    public String writes() {
        return compression != null ? compression : write != null ? write : ZSTD;
    }

    /** zstd(msgpack(msg)), or msgpack(msg) on an uncompressed connection: byte[] values become msgpack bin, String values str. */
    public byte[] pack(Map<String, Object> msg) {
        byte[] payload = MsgPack.pack(msg);
        return NONE.equals(writes()) ? payload : zstd().compress(payload);
    }

    /** The map inside one frame; any defect is a ProtocolException (bad_frame or too_large). */
    @SuppressWarnings("unchecked")
    public Map<String, Object> unpack(byte[] data) throws ProtocolException {
        if (data.length > maxFrameBytes) {
            throw new ProtocolException("too_large", "frame of " + data.length + " bytes > " + maxFrameBytes);
        }
        String form = isZstd(data) ? ZSTD : NONE;
        if (compression != null && !form.equals(compression)) {
            throw new ProtocolException("bad_frame", "a " + (form.equals(ZSTD) ? "zstd" : "not zstd-compressed")
                    + " frame on a connection that negotiated compression " + compression);
        }
        byte[] payload = form.equals(ZSTD) ? decompress(data) : data;
        Object msg = MsgPack.unpack(payload, Limits.MAX_ARRAY_LEN, Limits.MAX_MAP_LEN, Limits.MAX_DEPTH);
        if (!(msg instanceof Map)) {
            String kind = msg == null ? "nil" : msg.getClass().getSimpleName();
            throw new ProtocolException("bad_frame", "expected a msgpack map, got " + kind);
        }
        return (Map<String, Object>) msg;
    }

    static boolean isZstd(byte[] data) {
        if (data.length < 4) return false;
        for (int i = 0; i < 4; i++) if (data[i] != ZSTD_MAGIC[i]) return false;
        return true;
    }

    private static void check(String form) {
        if (!ZSTD.equals(form) && !NONE.equals(form)) throw new IllegalArgumentException("unknown frame compression " + form);
    }

    private Zstd zstd() {
        if (zstd == null) zstd = new Zstd(level);
        return zstd;
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
        return zstd().decompress(data, (int) header.contentSize);
    }

    @Override
    public void close() {
        if (zstd != null) zstd.close();
    }

    /** zstd-jni, touched only when a connection uses zstd (the class loads its native library). */
    private static final class Zstd {
        private final ZstdCompressCtx compressor = new ZstdCompressCtx();
        private final ZstdDecompressCtx decompressor = new ZstdDecompressCtx();

        Zstd(int level) {
            compressor.setLevel(level);
            compressor.setContentSize(true); // the spec requires the size in the header
            compressor.setChecksum(false);
        }

        byte[] compress(byte[] payload) {
            return compressor.compress(payload);
        }

        byte[] decompress(byte[] data, int size) throws ProtocolException {
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

        void close() {
            compressor.close();
            decompressor.close();
        }
    }
}
