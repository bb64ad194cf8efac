package org.spa.protocol;

import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;

/** Protocol error codes and the websocket close code of each (docs/PROTOCOL.md section 7). */
public final class ErrorCodes {
    public static final int NORMAL_CLOSE = 1000; // after `end`, or on `bye`

    /** code -> websocket close code; a copy of spa.protocol.errors.CODES. */
    public static final Map<String, Integer> CLOSE_CODES;

    static {
        Map<String, Integer> m = new LinkedHashMap<String, Integer>();
        m.put("bad_frame", 4000);
        m.put("too_large", 1009);
        m.put("unknown_type", 4001);
        m.put("bad_field", 4002);
        m.put("out_of_order", 4003);
        m.put("unauthorized", 1008);
        m.put("version", 4004);
        m.put("backbone_mismatch", 4005);
        m.put("limit", 4006);
        m.put("busy", 1013);
        m.put("idle_timeout", 4007);
        m.put("resume_failed", 4008);
        m.put("internal", 1011);
        CLOSE_CODES = Collections.unmodifiableMap(m);
    }

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
