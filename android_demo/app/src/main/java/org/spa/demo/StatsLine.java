package org.spa.demo;

import java.util.Locale;
import java.util.Map;

/** One line of session statistics for the screen (the keys GatewayClient reports). */
final class StatsLine {
    private StatsLine() {}

    static String format(Map<String, Object> s) {
        return String.format(Locale.US,
                "%d tokens · side network on %.0f%% · %.0f B/token down, %.0f B/token up · %d round trips · "
                        + "%s tokens/s · first token %s · %d rollbacks",
                num(s, "tokens").intValue(), 100 * num(s, "side_usage").doubleValue(),
                num(s, "bytes_down_per_token").doubleValue(), num(s, "bytes_up_per_token").doubleValue(),
                num(s, "round_trips").intValue(), orDash(s.get("tokens_per_s"), "%.1f"),
                orDash(s.get("ttft_s"), "%.2f s"), num(s, "rollbacks").intValue());
    }

    private static Number num(Map<String, Object> s, String k) {
        Object v = s.get(k);
        return v instanceof Number ? (Number) v : 0;
    }

    private static String orDash(Object v, String fmt) {
        return v instanceof Number ? String.format(Locale.US, fmt, ((Number) v).doubleValue()) : "–";
    }
}
