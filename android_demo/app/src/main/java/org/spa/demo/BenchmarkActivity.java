package org.spa.demo;

import java.io.File;
import java.io.FileInputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import android.app.Activity;
import android.content.Intent;
import android.os.Build;
import android.os.Bundle;
import android.util.Log;
import android.widget.TextView;

import org.spa.demo.core.BenchmarkRun;
import org.spa.demo.core.BoundedRead;
import org.spa.demo.core.Failures;
import org.spa.demo.core.GatewayConnector;
import org.spa.demo.core.OutputPaths;
import org.spa.demo.core.SessionRunner;
import org.spa.demo.core.SummaryJob;
import org.spa.protocol.Messages;

/**
 * Benchmark mode, for `spa bench device --adb`. Only the shell user (adb) can start it: the
 * manifest protects it with android.permission.DUMP, which adb's shell holds and apps cannot get.
 * <pre>
 * adb shell am start -S -W -n org.spa.demo/.BenchmarkActivity \
 *     --es pte /data/local/tmp/spa/plugin-fp32.pte,/data/local/tmp/spa/plugin-int8.pte \
 *     --ei iterations 200 --ei warmup 20 \
 *     --es out /sdcard/Android/data/org.spa.demo/files/bench.json
 * </pre>
 * Each .pte is measured in turn on one background thread (PteBenchmark). With
 * {@code --es mode summarize} it instead runs one summary end to end through the host's gateway
 * (reached with `adb reverse`): extras {@code pte} (one path), {@code gateway}, {@code token},
 * {@code prompt_file} (the final prompt text, pushed to the phone), {@code window},
 * {@code max_new_tokens}, {@code codec}, {@code tau}.
 * The result file (schema in android_demo/README.md) goes under the app's own folders only and
 * is written in every case; logcat gets SPA_BENCH_DONE or SPA_BENCH_FAILED (tag SPA). See
 * BenchmarkRun for the rules; one run per process at a time.
 */
public class BenchmarkActivity extends Activity {
    static final String SCHEMA = "spa-android-bench/1";
    private TextView view;

    private static final BenchmarkRun.Log LOG = new BenchmarkRun.Log() {
        @Override
        public void info(String line) {
            Log.i(MainActivity.TAG, line);
        }

        @Override
        public void error(String line) {
            Log.e(MainActivity.TAG, line);
        }
    };

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        NativeRuntime.check(this);
        view = new TextView(this);
        view.setPadding(24, 24, 24, 24);
        setContentView(view);
        if (!BenchmarkRun.claim()) { // e.g. this activity re-created while its run goes on
            view.setText("A benchmark is already running in this process; its result goes where it was asked to.");
            return;
        }
        boolean started = false;
        try {
            started = begin(getIntent());
        } catch (Throwable t) {
            fail(Failures.describe(t));
        } finally {
            if (!started) BenchmarkRun.finish();
        }
    }

    /** Reads the extras and starts the run's thread; false (after logging why) if it cannot. */
    private boolean begin(Intent intent) {
        String mode = intent.getStringExtra("mode");
        final boolean summarize = "summarize".equals(mode);
        if (mode != null && !summarize && !"bench".equals(mode)) return fail("unknown --es mode " + mode + " (bench, summarize)");
        final String pte = intent.getStringExtra("pte");
        if (pte == null || pte.trim().isEmpty()) return fail("no --es pte");
        File external = getExternalFilesDir(null);
        final File outFile;
        try {
            outFile = OutputPaths.resolve(intent.getStringExtra("out"),
                    new File(external != null ? external : getFilesDir(), "bench.json"), external, getFilesDir());
        } catch (IOException e) {
            return fail(e.getMessage());
        }
        final Map<String, Object> header = new LinkedHashMap<String, Object>();
        header.put("schema", SCHEMA);
        header.put("mode", summarize ? "summarize" : "bench");
        header.put("device", device());
        final List<String> items = new ArrayList<String>();
        final BenchmarkRun.Job job;
        if (summarize) {
            String url = intent.getStringExtra("gateway");
            String promptFile = intent.getStringExtra("prompt_file");
            if (url == null || promptFile == null) return fail("summarize needs --es gateway URL and --es prompt_file PATH");
            String prompt;
            try {
                prompt = readPrompt(new File(promptFile));
            } catch (IOException e) {
                return fail("cannot read " + promptFile + ": " + e.getMessage());
            }
            Messages.Options options = new Messages.Options();
            options.window = intent.getIntExtra("window", options.window);
            options.maxNewTokens = intent.getIntExtra("max_new_tokens", 64);
            if (intent.getStringExtra("codec") != null) options.codec = intent.getStringExtra("codec");
            String tau = intent.getStringExtra("tau");
            Double tauValue;
            try {
                tauValue = tau == null || tau.isEmpty() ? null : Double.valueOf(tau);
            } catch (NumberFormatException e) {
                return fail("--es tau " + tau + " is not a number");
            }
            header.put("gateway", url);
            header.put("window", options.window);
            header.put("max_new_tokens", options.maxNewTokens);
            header.put("iterations", 1);
            header.put("warmup", 0);
            items.add(pte.trim());
            job = new SummaryJob(new SessionRunner.PluginLoader() {
                @Override
                public SessionRunner.Plugin load(String path) {
                    return ExecuTorchPluginExecutor.load(path);
                }
            }, new GatewayConnector(Math.max(1, intent.getIntExtra("in_flight", 4)), intent.getBooleanExtra("push_taps", true),
                    intent.getBooleanExtra("cloud_projection", true),
                    intent.getBooleanExtra("settle", true) ? GatewayConnector.HEADS : null), url, intent.getStringExtra("token"), prompt, options, tauValue);
        } else {
            final int iterations = Math.max(1, intent.getIntExtra("iterations", 200));
            final int warmup = Math.max(0, intent.getIntExtra("warmup", 20));
            header.put("iterations", iterations);
            header.put("warmup", warmup);
            for (String p : pte.split(",")) if (!p.trim().isEmpty()) items.add(p.trim());
            job = new BenchmarkRun.Job() {
                @Override
                public Map<String, Object> run(String item) {
                    return PteBenchmark.run(item, iterations, warmup);
                }
            };
        }
        view.setText((summarize ? "Summarizing through " + header.get("gateway") + " with " : "Benchmarking ") + pte + "…");
        new Thread(new Runnable() {
            @Override
            public void run() {
                String last;
                try {
                    last = BenchmarkRun.execute(header, items, job, outFile, LOG);
                } catch (Throwable t) { // BenchmarkRun catches per item; this is the last resort
                    last = "SPA_BENCH_FAILED " + Failures.describe(t);
                    LOG.error(last);
                } finally {
                    BenchmarkRun.finish();
                }
                final String shown = last;
                runOnUiThread(new Runnable() {
                    @Override
                    public void run() {
                        view.setText(shown);
                        if (!isDestroyed()) finish();
                    }
                });
            }
        }, "spa-bench").start();
        return true;
    }

    private boolean fail(String why) {
        String line = "SPA_BENCH_FAILED " + why;
        LOG.error(line);
        view.setText(line + "\n(see android_demo/README.md, \"Benchmark mode\")");
        return false;
    }

    private static String readPrompt(File f) throws IOException {
        InputStream in = new FileInputStream(f);
        try {
            return new String(BoundedRead.readAll(in, BoundedRead.MAX_DOCUMENT_BYTES), StandardCharsets.UTF_8);
        } finally {
            in.close();
        }
    }

    private static Map<String, Object> device() {
        Map<String, Object> d = new LinkedHashMap<String, Object>();
        d.put("manufacturer", Build.MANUFACTURER);
        d.put("model", Build.MODEL);
        d.put("android_sdk", Build.VERSION.SDK_INT);
        d.put("abi", Build.SUPPORTED_ABIS.length > 0 ? Build.SUPPORTED_ABIS[0] : "");
        d.put("cores", Runtime.getRuntime().availableProcessors());
        return d;
    }
}
