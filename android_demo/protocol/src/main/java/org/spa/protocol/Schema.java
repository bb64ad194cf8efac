package org.spa.protocol;

import java.util.Collections;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * The wire protocol's constants, GENERATED from spa/protocol/schema.json by
 * `python -m spa.protocol.schema --write`: do not edit; tests check it is current.
 */
public final class Schema {
    private Schema() {}

    public static final int VERSION = 3;
    /** The versions a gateway accepts in hello.version (a version 2 device gets version 2's behaviour). */
    public static final int[] VERSIONS = {2, 3};
    public static final int NORMAL_CLOSE = 1000;
    /** Every message type (docs/PROTOCOL.md section 4). */
    public static final String[] TYPES = {"hello", "accept", "need_taps", "side", "settled", "bye", "teach", "ready", "step", "taps", "verdict", "end", "resumed", "states", "error"};
    /** The types each side receives; `error` goes both ways. */
    public static final String[] GATEWAY_RECEIVES = {"accept", "bye", "error", "hello", "need_taps", "settled", "side", "teach"};
    public static final String[] DEVICE_RECEIVES = {"end", "error", "ready", "resumed", "states", "step", "taps", "verdict"};
    /** Error code -> websocket close code (docs/PROTOCOL.md section 7). */
    public static final Map<String, Integer> CLOSE_CODES;
    /** Limit name -> the reference gateway's default (docs/PROTOCOL.md section 8). */
    public static final Map<String, Double> LIMIT_DEFAULTS;

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
        m.put("slow_reader", 4009);
        m.put("upload_needed", 4010);
        m.put("internal", 1011);
        CLOSE_CODES = Collections.unmodifiableMap(m);
    }

    static {
        Map<String, Double> m = new LinkedHashMap<String, Double>();
        m.put("max_frame_bytes", 2097152.0);
        m.put("max_message_bytes", 8388608.0);
        m.put("max_prompt_tokens", 4096.0);
        m.put("max_new_tokens", 2048.0);
        m.put("max_window", 64.0);
        m.put("max_teach_tokens", 512.0);
        m.put("max_sessions", 8.0);
        m.put("idle_timeout_s", 120.0);
        m.put("resume_grace_s", 30.0);
        m.put("send_timeout_s", 30.0);
        LIMIT_DEFAULTS = Collections.unmodifiableMap(m);
    }
}
