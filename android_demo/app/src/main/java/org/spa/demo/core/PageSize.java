package org.spa.demo.core;

import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/**
 * The kernel's page size, from this process's auxiliary vector (AT_PAGESZ in /proc/self/auxv),
 * without Android APIs: 4096 on most phones, 16384 on Android 15+ devices built with 16 KB
 * pages (and Pixel 8/9 with the 16 KB developer option on).
 */
public final class PageSize {
    private static final long AT_NULL = 0, AT_PAGESZ = 6;

    private PageSize() {}

    /** AT_PAGESZ of an auxiliary vector (native-endian pairs of words: 8 bytes each on 64-bit, 4 on 32-bit). */
    public static long fromAuxv(byte[] auxv, boolean is64, ByteOrder order) throws IOException {
        ByteBuffer b = ByteBuffer.wrap(auxv).order(order);
        int word = is64 ? 8 : 4;
        for (int at = 0; at + 2 * word <= auxv.length; at += 2 * word) {
            long type = is64 ? b.getLong(at) : b.getInt(at) & 0xffffffffL;
            long value = is64 ? b.getLong(at + word) : b.getInt(at + word) & 0xffffffffL;
            if (type == AT_PAGESZ) return value;
            if (type == AT_NULL) break;
        }
        throw new IOException("no AT_PAGESZ in the auxiliary vector");
    }

    /** This process's page size; IOException where /proc/self/auxv cannot be read. */
    public static long current() throws IOException {
        InputStream in = new FileInputStream(new File("/proc/self/auxv"));
        try {
            boolean is64 = String.valueOf(System.getProperty("os.arch")).contains("64");
            return fromAuxv(BoundedRead.readAll(in, 1 << 16), is64, ByteOrder.nativeOrder());
        } finally {
            in.close();
        }
    }
}
