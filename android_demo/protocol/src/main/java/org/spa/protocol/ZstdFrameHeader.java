package org.spa.protocol;

/**
 * Reads a zstd frame's header and walks its block headers (RFC 8878 section 3.1.1)
 * without decompressing anything. That gives the stated content size, so a
 * frame claiming more than the limit is refused before any allocation, and the
 * exact frame length, so trailing bytes (a second frame, garbage) are refused
 * the way the reference's `allow_extra_data=False` does. It does not depend on
 * which zstd-jni version the app ships.
 */
final class ZstdFrameHeader {
    static final int MAGIC = 0xFD2FB528;
    static final long UNKNOWN = -1;

    /** Frame_Content_Size, or UNKNOWN when the header does not state it. */
    final long contentSize;
    /** Bytes the frame occupies, header + blocks + optional checksum. */
    final int frameLength;

    private ZstdFrameHeader(long contentSize, int frameLength) {
        this.contentSize = contentSize;
        this.frameLength = frameLength;
    }

    /** Parse one frame at the start of `data`; anything malformed is `bad_frame`. */
    static ZstdFrameHeader parse(byte[] data) throws ProtocolException {
        if (data.length < 6) throw bad("too short for a zstd frame");
        int magic = u32(data, 0);
        if ((magic & 0xFFFFFFF0) == 0x184D2A50) throw bad("skippable zstd frames are not allowed");
        if (magic != MAGIC) throw bad("not a zstd frame (bad magic number)");
        int fhd = data[4] & 0xff;
        int fcsFlag = fhd >>> 6;
        boolean singleSegment = (fhd & 0x20) != 0;
        boolean checksum = (fhd & 0x04) != 0;
        int didFlag = fhd & 0x03;
        if ((fhd & 0x08) != 0) throw bad("reserved bit set in the zstd frame header");
        int pos = 5;
        if (!singleSegment) pos += 1; // Window_Descriptor
        int didSize = didFlag == 0 ? 0 : didFlag == 1 ? 1 : didFlag == 2 ? 2 : 4;
        int fcsSize = fcsFlag == 0 ? (singleSegment ? 1 : 0) : fcsFlag == 1 ? 2 : fcsFlag == 2 ? 4 : 8;
        if (data.length < pos + didSize + fcsSize) throw bad("truncated zstd frame header");
        long dictId = 0;
        for (int i = 0; i < didSize; i++) dictId |= (long) (data[pos + i] & 0xff) << (8 * i);
        if (dictId != 0) throw bad("zstd dictionaries are not allowed");
        pos += didSize;
        long size = UNKNOWN;
        if (fcsSize > 0) {
            long v = 0;
            for (int i = 0; i < fcsSize; i++) v |= (long) (data[pos + i] & 0xff) << (8 * i);
            size = fcsSize == 2 ? v + 256 : v;
            if (size < 0) size = Long.MAX_VALUE; // an 8-byte size beyond 2^63: over any limit
        }
        pos += fcsSize;
        // Blocks: 3-byte little-endian header = Last_Block (1 bit), Block_Type (2), Block_Size (21).
        while (true) {
            if (data.length < pos + 3) throw bad("truncated zstd frame");
            int bh = (data[pos] & 0xff) | (data[pos + 1] & 0xff) << 8 | (data[pos + 2] & 0xff) << 16;
            pos += 3;
            boolean last = (bh & 1) != 0;
            int type = (bh >>> 1) & 3;
            int blockSize = bh >>> 3;
            if (type == 3) throw bad("reserved zstd block type");
            int stored = type == 1 ? 1 : blockSize; // RLE blocks store one byte
            if (data.length - pos < stored) throw bad("truncated zstd frame");
            pos += stored;
            if (last) break;
        }
        if (checksum) pos += 4;
        if (pos > data.length) throw bad("truncated zstd frame checksum");
        return new ZstdFrameHeader(size, pos);
    }

    private static int u32(byte[] b, int i) {
        return (b[i] & 0xff) | (b[i + 1] & 0xff) << 8 | (b[i + 2] & 0xff) << 16 | (b[i + 3] & 0xff) << 24;
    }

    private static ProtocolException bad(String message) {
        return new ProtocolException("bad_frame", message);
    }
}
