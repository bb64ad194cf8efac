package org.spa.protocol;

import java.io.File;
import java.io.IOException;
import java.util.List;
import java.util.Map;

/**
 * The parts of a plugin's config.json (spa/model/plugin.py PluginConfig) that the
 * device needs: taps, width, gate threshold, prompt format and the backbone it
 * was trained for. Export writes config.json beside the .pte files.
 */
public final class PluginConfig {
    public final String backboneName;
    public final String fingerprint;
    public final int numLayers;
    public final int hiddenSize;
    public final int[] taps;
    public final int rank;
    public final float sideScale;
    public final double tau;
    public final String promptTemplate;
    public final String instruction;
    public final int maxDocTokens;
    public final String contentHash;
    public final String profile; // may be null
    public final Map<String, Object> raw;
    /** The gate reads [f_t, m_t], m_t the backbone's top-2 logit margin that each step carries (spa/model/plugin.py). */
    public final boolean gateMargin;
    static final String PLAIN_GATE = "rms_normalized_f", MARGIN_GATE = "rms_normalized_f+log_margin";

    private PluginConfig(Map<String, Object> d) {
        raw = d;
        Map<String, Object> backbone = map(d, "backbone");
        backboneName = str(backbone, "name");
        fingerprint = str(backbone, "fingerprint");
        numLayers = (int) num(backbone, "num_layers");
        hiddenSize = (int) num(backbone, "hidden_size");
        Object t = d.get("taps");
        if (!(t instanceof List) || ((List<?>) t).isEmpty()) throw new IllegalArgumentException("config.json: taps must be a non-empty list");
        List<?> tl = (List<?>) t;
        taps = new int[tl.size()];
        for (int i = 0; i < taps.length; i++) {
            taps[i] = ((Number) tl.get(i)).intValue();
            if (i > 0 && taps[i] <= taps[i - 1]) throw new IllegalArgumentException("config.json: taps must be ascending");
        }
        if (taps[0] != 0) throw new IllegalArgumentException("config.json: taps must start with 0 (the embedding)");
        rank = (int) num(d, "rank");
        sideScale = (float) num(d, "side_scale");
        tau = num(d, "tau");
        promptTemplate = d.containsKey("prompt_template") ? str(d, "prompt_template") : "{document}\n\n{instruction}";
        instruction = d.containsKey("instruction") ? str(d, "instruction") : "";
        maxDocTokens = d.containsKey("max_doc_tokens") ? (int) num(d, "max_doc_tokens") : 384;
        contentHash = str(d, "content_hash");
        profile = d.get("profile") instanceof String ? (String) d.get("profile") : null;
        // The host executor implements exactly one plugin variant, as spa/model/plugin.py validates.
        Object gateInput = orDefault(d, "gate_input", PLAIN_GATE);
        if (!"gelu".equals(orDefault(d, "activation", "gelu")) || !"rms".equals(orDefault(d, "tap_norm", "rms"))
                || !(PLAIN_GATE.equals(gateInput) || MARGIN_GATE.equals(gateInput))) {
            throw new IllegalArgumentException("config.json: unsupported plugin variant (activation/gate_input/tap_norm)");
        }
        gateMargin = MARGIN_GATE.equals(gateInput);
    }

    public static PluginConfig parse(String json) {
        return new PluginConfig(Json.parseObject(json));
    }

    public static PluginConfig load(File file) throws IOException {
        try {
            return parse(Files2.readUtf8(file));
        } catch (IllegalArgumentException | ClassCastException e) {
            throw new IOException(file + " is not a plugin config: " + e.getMessage(), e);
        }
    }

    /** The plugin part of `hello`. */
    public Messages.Plugin helloPlugin() {
        return new Messages.Plugin(fingerprint, taps, contentHash);
    }

    private static Object orDefault(Map<String, Object> d, String k, Object dflt) {
        return d.containsKey(k) ? d.get(k) : dflt;
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> map(Map<String, Object> d, String k) {
        Object v = d.get(k);
        if (!(v instanceof Map)) throw new IllegalArgumentException("config.json: " + k + " must be an object");
        return (Map<String, Object>) v;
    }

    private static String str(Map<String, Object> d, String k) {
        Object v = d.get(k);
        if (!(v instanceof String)) throw new IllegalArgumentException("config.json: " + k + " must be a string");
        return (String) v;
    }

    private static double num(Map<String, Object> d, String k) {
        Object v = d.get(k);
        if (!(v instanceof Number)) throw new IllegalArgumentException("config.json: " + k + " must be a number");
        return ((Number) v).doubleValue();
    }
}
