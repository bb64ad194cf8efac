package org.spa.protocol;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** What a session produced: committed tokens, their sigma, the text and the statistics. */
public final class SessionResult {
    public final List<Long> tokens = new ArrayList<Long>();
    public final List<Integer> sigmas = new ArrayList<Integer>(); // 1 where the side network chose the token
    public final List<Integer> changed = new ArrayList<Integer>(); // 1 where it chose another token than the draft
    // The gate's p at each committed token's position (float32 widened): lets a test
    // check its margin to tau before comparing tokens with another runtime.
    public final List<Double> gateP = new ArrayList<Double>();
    public String text = "";
    public String finishReason = "";
    public final Map<String, Object> stats = new LinkedHashMap<String, Object>();

    /** {"tokens", "text", "sigma", "sigmas", "gate_p", "finish_reason", "stats"} for the CLI. */
    public Map<String, Object> toMap() {
        Map<String, Object> d = new LinkedHashMap<String, Object>();
        d.put("tokens", tokens);
        d.put("text", text);
        d.put("sigma", sigmas);
        d.put("sigmas", sigmas); // the key the Python client (`spa summarize --json`) uses
        d.put("changed", changed);
        d.put("gate_p", gateP);
        d.put("finish_reason", finishReason);
        d.put("stats", stats);
        return d;
    }
}
