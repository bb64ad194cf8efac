package org.spa.demo.core;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;

/** Reading a stream someone else controls (a shared file, a picked document) with a size limit. */
public final class BoundedRead {
    /** Documents shared or pasted into the app: the prompt keeps only max_doc_tokens x 4 characters anyway. */
    public static final int MAX_DOCUMENT_BYTES = 4 << 20;

    private BoundedRead() {}

    /** All of {@code in}, or an IOException once it exceeds {@code maxBytes}. Does not close it. */
    public static byte[] readAll(InputStream in, int maxBytes) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buf = new byte[1 << 16];
        int n;
        while ((n = in.read(buf)) > 0) {
            if (out.size() + (long) n > maxBytes) {
                throw new IOException("larger than " + (maxBytes >> 20) + " MB; share a shorter document");
            }
            out.write(buf, 0, n);
        }
        return out.toByteArray();
    }

    /** The first {@code n} bytes of {@code in} (fewer if it ends first). Does not close it. */
    public static byte[] head(InputStream in, int n) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        byte[] buf = new byte[Math.min(n, 1 << 16)];
        int got;
        while (out.size() < n && (got = in.read(buf, 0, Math.min(buf.length, n - out.size()))) > 0) out.write(buf, 0, got);
        return out.toByteArray();
    }
}
