package org.spa.protocol;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.OutputStreamWriter;
import java.io.Writer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * The Java device as the device side of one `spa bench link` SPA row (`--device-client java`):
 * the twin of benchmarks/device_worker.py's "spa" mode, same JOB and OUT files, so the
 * benchmark measures both clients the same way.
 *
 * <pre>
 * java -cp ... org.spa.protocol.BenchWorker JOB.json OUT.json     (android_demo/scripts/bench_worker.sh)
 * JOB: {"mode": "spa", "prompts": [...], "max_new_tokens", "url", "token", "pte" (its directory holds
 *       config.json and plugin.safetensors), "options": {window, codec, outliers}, "tau" (null: the
 *       plugin's), "max_in_flight", "push_taps", "cloud_projection", "settle" (prove side tokens with the
 *       backbone's output head in the cache, as `spa summarize` does)}
 * OUT: {"mode", "load_s", "client": "java", "docs": [{tokens, sigmas, changed, commit_s, ttft_s, bytes_down,
 *       bytes_up, handshake_down, handshake_up, round_trips, side_tokens, rollbacks, messages_down, messages_up,
 *       settled}]}
 * </pre>
 *
 * The clock starts before the connection is opened and a token counts when it is committed,
 * as in the Python worker. The plugin runs in {@link HostPluginExecutor} (pure Java on the
 * host JVM), not in ExecuTorch: a phone's compute time is not what this measures.
 */
public final class BenchWorker {
    private BenchWorker() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 2) {
            System.err.println("usage: BenchWorker JOB.json OUT.json");
            System.exit(2);
        }
        Map<String, Object> job = Json.parseObject(Files2.readUtf8(new File(args[0])));
        try {
            write(new File(args[1]), Json.write(run(job)));
        } catch (ClientException e) {
            System.err.println("error: " + e.getMessage());
            System.exit(1);
        }
    }

    static Map<String, Object> run(Map<String, Object> job) throws IOException, ClientException {
        if (!"spa".equals(job.get("mode"))) throw new IllegalArgumentException("the Java worker runs only mode spa, not " + job.get("mode"));
        long t0 = System.nanoTime();
        HostPluginExecutor plugin = HostPluginExecutor.load(new File(String.valueOf(job.get("pte"))).getParentFile());
        double loadS = (System.nanoTime() - t0) / 1e9;
        Object tau = job.get("tau");
        double threshold = tau instanceof Number ? ((Number) tau).doubleValue() : plugin.config.tau;
        OutputHead head = null; // loaded once for every document (memory-mapped)
        if (Boolean.TRUE.equals(job.get("settle"))) {
            File file = OutputHead.cachedPath(plugin.config.helloPlugin().fingerprint);
            if (!file.isFile()) throw new ClientException("settle: no output head at " + file + " (spa export writes it)");
            head = OutputHead.load(file);
        }
        List<Object> docs = new ArrayList<Object>();
        for (Object prompt : (List<?>) job.get("prompts")) docs.add(one(job, plugin, threshold, String.valueOf(prompt), head));
        Map<String, Object> out = new LinkedHashMap<String, Object>();
        out.put("mode", "spa");
        out.put("load_s", loadS);
        out.put("client", "java");
        out.put("docs", docs);
        return out;
    }

    private static Map<String, Object> one(Map<String, Object> job, HostPluginExecutor plugin, double tau, String prompt,
                                           OutputHead head) throws ClientException {
        Map<?, ?> o = (Map<?, ?>) job.get("options");
        Messages.Options options = new Messages.Options();
        options.window = ((Number) o.get("window")).intValue();
        options.codec = String.valueOf(o.get("codec"));
        options.outliers = ((Number) o.get("outliers")).intValue();
        options.maxNewTokens = ((Number) job.get("max_new_tokens")).intValue();
        Object inFlight = job.get("max_in_flight");
        GatewayClient client = new GatewayClient(String.valueOf(job.get("url")), plugin, plugin.config.helloPlugin(), tau,
                job.get("token") == null ? "" : String.valueOf(job.get("token")))
                .inFlight(inFlight instanceof Number ? ((Number) inFlight).intValue() : 1)
                .pushTaps(Boolean.TRUE.equals(job.get("push_taps")))
                .cloudProjection(Boolean.TRUE.equals(job.get("cloud_projection")))
                .settle(head);
        final List<Object> times = new ArrayList<Object>();
        final long start = System.nanoTime();
        SessionResult r = client.run(prompt, options, new GatewayClient.Listener() {
            @Override
            public void onCommit(Commit commit, String text) {
                times.add((System.nanoTime() - start) / 1e9);
            }
        });
        Map<String, Object> s = r.stats, d = new LinkedHashMap<String, Object>();
        d.put("tokens", r.tokens);
        d.put("sigmas", r.sigmas);
        d.put("changed", r.changed);
        d.put("commit_s", times);
        d.put("ttft_s", times.isEmpty() ? null : times.get(0));
        d.put("bytes_down", s.get("bytes_down"));
        d.put("bytes_up", s.get("bytes_up"));
        d.put("handshake_down", s.get("handshake_bytes_down"));
        d.put("handshake_up", s.get("handshake_bytes_up"));
        d.put("round_trips", s.get("round_trips"));
        d.put("side_tokens", s.get("side_tokens"));
        d.put("rollbacks", s.get("rollbacks"));
        d.put("messages_down", s.get("messages_down"));
        d.put("messages_up", s.get("messages_up"));
        d.put("settled", s.get("settled"));
        return d;
    }

    private static void write(File out, String json) throws IOException {
        Writer w = new OutputStreamWriter(new FileOutputStream(out), StandardCharsets.UTF_8);
        try {
            w.write(json);
        } finally {
            w.close();
        }
    }
}
