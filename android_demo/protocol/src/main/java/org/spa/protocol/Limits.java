package org.spa.protocol;

/**
 * Frame and decoder limits (docs/PROTOCOL.md section 8). The gateway's limits are
 * the ones that count; a device uses the same defaults for what it receives.
 */
public final class Limits {
    /** Largest compressed websocket message accepted, in bytes. */
    public static final int MAX_FRAME_BYTES = 2 << 20;
    /** Largest decompressed msgpack payload, in bytes (checked from the zstd header). */
    public static final int MAX_MESSAGE_BYTES = 8 << 20;
    /** Longest msgpack array a frame may hold. */
    public static final int MAX_ARRAY_LEN = 4096;
    /** Most keys in one msgpack map. */
    public static final int MAX_MAP_LEN = 256;
    /**
     * Deepest msgpack nesting accepted. Messages nest three levels; the Python
     * reference's C unpacker stops at 1024. A smaller cap keeps the recursive
     * Java reader's stack small; no valid message comes near it.
     */
    public static final int MAX_DEPTH = 64;

    private Limits() {}
}
