package org.spa.demo.core;

import java.util.LinkedHashMap;
import java.util.Map;

import org.spa.protocol.Messages;
import org.spa.protocol.SessionResult;

/**
 * Benchmark mode's end-to-end run: one summary of the split on the phone — the plugin in
 * ExecuTorch here, the backbone in the host's gateway (reached through `adb reverse`) — with the
 * client's statistics (tokens/s, bytes and round trips per token), so that the host can put
 * them beside the same run of its Python device client.
 */
public final class SummaryJob implements BenchmarkRun.Job {
    private final SessionRunner.PluginLoader loader;
    private final SessionRunner.Connector connector;
    private final String url, token, prompt;
    private final Messages.Options options;
    private final Double tau;

    /** @param prompt the final prompt text (the plugin's template already filled in) */
    public SummaryJob(SessionRunner.PluginLoader loader, SessionRunner.Connector connector, String url, String token,
                      String prompt, Messages.Options options, Double tau) {
        this.loader = loader;
        this.connector = connector;
        this.url = url;
        this.token = token == null ? "" : token;
        this.prompt = prompt;
        this.options = options;
        this.tau = tau;
    }

    @Override
    public Map<String, Object> run(String ptePath) throws Exception {
        Map<String, Object> r = new LinkedHashMap<String, Object>();
        r.put("pte", ptePath);
        long t0 = System.nanoTime();
        SessionRunner.Plugin plugin = loader.load(ptePath);
        try {
            r.put("load_ms", (System.nanoTime() - t0) / 1e6);
            r.put("content_hash", plugin.config().contentHash);
            double threshold = tau != null ? tau : plugin.config().tau;
            SessionResult result = connector.connect(url, plugin, plugin.config().helloPlugin(), threshold, token)
                    .run(prompt, options, null);
            r.put("tokens", result.tokens);
            r.put("sigma", result.sigmas);
            r.put("text", result.text);
            r.put("finish_reason", result.finishReason);
            r.put("stats", result.stats);
            r.put("error", null);
            return r;
        } finally {
            plugin.close();
        }
    }
}
