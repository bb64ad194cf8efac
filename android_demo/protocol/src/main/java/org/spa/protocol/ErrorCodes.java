package org.spa.protocol;

import java.util.Map;

/** Protocol error codes and the websocket close code of each (docs/PROTOCOL.md section 7). */
public final class ErrorCodes {
    public static final int NORMAL_CLOSE = Schema.NORMAL_CLOSE; // after `end`, or on `bye`

    /** code -> websocket close code, from spa/protocol/schema.json (via the generated {@link Schema}). */
    public static final Map<String, Integer> CLOSE_CODES = Schema.CLOSE_CODES;

    private ErrorCodes() {}

    public static boolean isKnown(String code) {
        return CLOSE_CODES.containsKey(code);
    }

    public static int closeCode(String code) {
        Integer c = CLOSE_CODES.get(code);
        if (c == null) throw new IllegalArgumentException("unknown protocol error code " + code);
        return c;
    }
}
