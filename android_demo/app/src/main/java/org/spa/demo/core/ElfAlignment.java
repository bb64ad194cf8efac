package org.spa.demo.core;

import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.Enumeration;
import java.util.Map;
import java.util.TreeMap;
import java.util.zip.ZipEntry;
import java.util.zip.ZipFile;

/**
 * The alignment of an ELF shared library's LOAD segments (what `readelf -lW` shows as Align):
 * a library loads on a phone whose kernel uses pages of size P only if every LOAD segment is
 * aligned to at least P. Read from the library's first bytes (the ELF header and program
 * headers sit at its start), so the app can check the libraries inside its own APK.
 */
public final class ElfAlignment {
    /** Bytes read from the start of each library: enough for the headers of any real library. */
    static final int HEAD_BYTES = 64 * 1024;
    private static final int PT_LOAD = 1;

    private ElfAlignment() {}

    /** The smallest p_align of the LOAD segments; IOException when these bytes are no ELF file. */
    public static long minLoadAlign(byte[] head) throws IOException {
        if (head.length < 52 || head[0] != 0x7f || head[1] != 'E' || head[2] != 'L' || head[3] != 'F') {
            throw new IOException("not an ELF file");
        }
        boolean is64 = head[4] == 2;
        ByteBuffer b = ByteBuffer.wrap(head).order(head[5] == 2 ? ByteOrder.BIG_ENDIAN : ByteOrder.LITTLE_ENDIAN);
        long phoff = is64 ? b.getLong(32) : b.getInt(28) & 0xffffffffL;
        int phentsize = b.getShort(is64 ? 54 : 42) & 0xffff;
        int phnum = b.getShort(is64 ? 56 : 44) & 0xffff;
        if (phentsize == 0 || phoff + (long) phnum * phentsize > head.length) throw new IOException("program headers out of reach");
        long min = Long.MAX_VALUE;
        for (int i = 0; i < phnum; i++) {
            int at = (int) (phoff + (long) i * phentsize);
            if (b.getInt(at) != PT_LOAD) continue;
            long align = is64 ? b.getLong(at + 48) : b.getInt(at + 28) & 0xffffffffL;
            min = Math.min(min, align);
        }
        if (min == Long.MAX_VALUE) throw new IOException("no LOAD segment");
        return min;
    }

    /** library file name -> its smallest LOAD alignment, for every lib/ABI/*.so in an APK. */
    public static Map<String, Long> inApk(File apk, String abi) throws IOException {
        Map<String, Long> out = new TreeMap<String, Long>();
        String prefix = "lib/" + abi + "/";
        ZipFile zip = new ZipFile(apk);
        try {
            for (Enumeration<? extends ZipEntry> e = zip.entries(); e.hasMoreElements(); ) {
                ZipEntry entry = e.nextElement();
                String name = entry.getName();
                if (!name.startsWith(prefix) || !name.endsWith(".so")) continue;
                InputStream in = zip.getInputStream(entry);
                try {
                    out.put(name.substring(prefix.length()), minLoadAlign(BoundedRead.head(in, HEAD_BYTES)));
                } finally {
                    in.close();
                }
            }
        } finally {
            zip.close();
        }
        return out;
    }
}
