package org.spa.demo;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.text.SimpleDateFormat;
import java.util.ArrayList;
import java.util.Date;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.TimeZone;

import android.app.Activity;
import android.content.Intent;
import android.os.Build;
import android.os.Bundle;
import android.util.Log;
import android.widget.TextView;

import org.spa.protocol.Json;

/**
 * Benchmark mode, for `spa bench device --adb`:
 * <pre>
 * adb shell am start -W -n org.spa.demo/.BenchmarkActivity \
 *     --es pte /data/local/tmp/spa/plugin-fp32.pte,/data/local/tmp/spa/plugin-int8.pte \
 *     --ei iterations 200 --ei warmup 20 \
 *     --es out /sdcard/Android/data/org.spa.demo/files/bench.json
 * </pre>
 * Each .pte is measured in turn on one background thread (see PteBenchmark);
 * the JSON (schema in android_demo/README.md) is written to a temporary file and
 * renamed, so a poller never reads half of it; then logcat gets
 * "SPA_BENCH_DONE <path>" (tag SPA) and the activity finishes.
 */
public class BenchmarkActivity extends Activity {
    static final String SCHEMA = "spa-android-bench/1";
    private TextView view;

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        view = new TextView(this);
        view.setPadding(24, 24, 24, 24);
        setContentView(view);
        Intent intent = getIntent();
        final String pte = intent.getStringExtra("pte");
        final int iterations = Math.max(1, intent.getIntExtra("iterations", 200));
        final int warmup = Math.max(0, intent.getIntExtra("warmup", 20));
        String out = intent.getStringExtra("out");
        File dir = getExternalFilesDir(null);
        final File outFile = out != null ? new File(out) : new File(dir != null ? dir : getFilesDir(), "bench.json");
        if (pte == null || pte.trim().isEmpty()) {
            view.setText("Benchmark mode needs --es pte PATH[,PATH...] (see android_demo/README.md).");
            Log.e(MainActivity.TAG, "SPA_BENCH_FAILED no --es pte");
            return;
        }
        view.setText("Benchmarking " + pte + " (" + iterations + " calls each)…");
        new Thread(new Runnable() {
            @Override
            public void run() {
                runAll(pte.split(","), iterations, warmup, outFile);
            }
        }, "spa-bench").start();
    }

    private void runAll(String[] ptes, int iterations, int warmup, final File outFile) {
        Map<String, Object> doc = new LinkedHashMap<String, Object>();
        doc.put("schema", SCHEMA);
        doc.put("started_at", now());
        doc.put("device", device());
        doc.put("iterations", iterations);
        doc.put("warmup", warmup);
        List<Object> results = new ArrayList<Object>();
        boolean ok = true;
        for (String p : ptes) {
            if (p.trim().isEmpty()) continue;
            Map<String, Object> r = PteBenchmark.run(p.trim(), iterations, warmup);
            ok &= r.get("error") == null;
            results.add(r);
            Log.i(MainActivity.TAG, "SPA_BENCH_RESULT " + Json.write(r));
        }
        doc.put("results", results);
        doc.put("finished_at", now());
        doc.put("ok", ok);
        final String message;
        try {
            write(outFile, Json.write(doc) + "\n");
            message = "SPA_BENCH_DONE " + outFile.getAbsolutePath();
            Log.i(MainActivity.TAG, message);
        } catch (IOException e) {
            Log.e(MainActivity.TAG, "SPA_BENCH_FAILED cannot write " + outFile + ": " + e);
            return;
        }
        runOnUiThread(new Runnable() {
            @Override
            public void run() {
                view.setText(message);
                finish();
            }
        });
    }

    private static void write(File file, String text) throws IOException {
        File parent = file.getParentFile();
        if (parent != null && !parent.isDirectory() && !parent.mkdirs()) throw new IOException("cannot create " + parent);
        File tmp = new File(file.getPath() + ".tmp");
        FileOutputStream out = new FileOutputStream(tmp);
        try {
            out.write(text.getBytes(StandardCharsets.UTF_8));
            out.getFD().sync();
        } finally {
            out.close();
        }
        if (!tmp.renameTo(file)) throw new IOException("cannot rename " + tmp + " to " + file);
    }

    private static String now() {
        SimpleDateFormat f = new SimpleDateFormat("yyyy-MM-dd'T'HH:mm:ss'Z'", Locale.US);
        f.setTimeZone(TimeZone.getTimeZone("UTC"));
        return f.format(new Date());
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
