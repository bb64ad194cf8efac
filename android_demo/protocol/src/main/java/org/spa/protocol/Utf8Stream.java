package org.spa.protocol;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;

/**
 * Decodes committed token pieces incrementally. A byte-level tokenizer may split
 * a character across tokens, so a trailing incomplete UTF-8 sequence is held
 * back until the next piece completes it (or {@link #finish} gives it up as U+FFFD).
 */
public final class Utf8Stream {
    private final ByteArrayOutputStream pending = new ByteArrayOutputStream();

    /** The text completed by `piece` (possibly empty). */
    public String append(byte[] piece) {
        pending.write(piece, 0, piece.length);
        byte[] b = pending.toByteArray();
        int cut = completePrefix(b);
        pending.reset();
        pending.write(b, cut, b.length - cut);
        return new String(b, 0, cut, StandardCharsets.UTF_8);
    }

    /** Whatever is still held back, malformed bytes as U+FFFD. */
    public String finish() {
        byte[] b = pending.toByteArray();
        pending.reset();
        return new String(b, StandardCharsets.UTF_8);
    }

    /** Length of `b` without a trailing sequence that is a valid start but incomplete. */
    static int completePrefix(byte[] b) {
        for (int back = 1; back <= Math.min(3, b.length); back++) {
            int lead = b[b.length - back] & 0xff;
            if ((lead & 0xC0) == 0x80) continue; // a continuation byte: look further back
            int need = lead >= 0xF0 && lead <= 0xF4 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC2 && lead < 0xE0 ? 2 : 1;
            return need > back ? b.length - back : b.length;
        }
        return b.length;
    }
}
