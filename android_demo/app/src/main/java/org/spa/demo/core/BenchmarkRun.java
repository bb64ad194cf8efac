package org.spa.demo.core;

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

import org.spa.protocol.Json;

/**
 * Benchmark mode's run, for `spa bench device --adb` (schema in android_demo/README.md). The host
 * learns the outcome twice: from logcat (tag SPA: {@code SPA_BENCH_RESULT <json>} per .pte, then
 * {@code SPA_BENCH_DONE <path>} or {@code SPA_BENCH_FAILED <why>}) and from the result file itself,
 * which is written in every case — with {@code "ok": false} and a {@code "failure"} when the run
 * could not finish — to {@code out + ".tmp"} and renamed, so a poller never reads half of it.
 *
 * <p>A RuntimeException while measuring one .pte is that .pte's error row; any Error (a native
 * library that cannot load, a failed static initializer) ends the run with SPA_BENCH_FAILED,
 * since every later .pte would fail the same way. Only one run at a time per process: an
 * activity re-created mid-run (rotation) does not start a second one.
 */
public final class BenchmarkRun {
    /** What the activity measures: one .pte (PteBenchmark), or one summary through the gateway. */
    public interface Job {
        /** One result row; its "error" key is null when it worked. */
        Map<String, Object> run(String item) throws Exception;
    }

    public interface Log {
        void info(String line);

        void error(String line);
    }

    private static final Object LOCK = new Object();
    private static boolean active;

    private BenchmarkRun() {}

    /** True if this process has a run in progress (a second start is refused). */
    public static boolean active() {
        synchronized (LOCK) {
            return active;
        }
    }

    /** Claims the single run slot; false if a run is in progress. Pair with {@link #finish()}. */
    public static boolean claim() {
        synchronized (LOCK) {
            if (active) return false;
            active = true;
            return true;
        }
    }

    public static void finish() {
        synchronized (LOCK) {
            active = false;
        }
    }

    /**
     * Runs {@code job} on each item in order and writes the document. {@code header} holds the
     * fixed fields (schema, device, iterations, ...). Returns the line logged last (DONE or FAILED).
     */
    public static String execute(Map<String, Object> header, List<String> items, Job job, File out, Log log) {
        Map<String, Object> doc = new LinkedHashMap<String, Object>(header);
        doc.put("started_at", now());
        List<Object> results = new ArrayList<Object>();
        doc.put("results", results);
        boolean ok = true;
        String failure = null;
        for (String item : items) {
            Map<String, Object> r;
            try {
                r = job.run(item);
            } catch (Exception e) {
                r = new LinkedHashMap<String, Object>();
                r.put("pte", item);
                r.put("error", Failures.describe(e));
            } catch (Throwable t) { // native trouble: stop here, say so on both channels
                failure = Failures.describe(t);
                r = new LinkedHashMap<String, Object>();
                r.put("pte", item);
                r.put("error", failure);
            }
            ok &= r.get("error") == null;
            results.add(r);
            log.info("SPA_BENCH_RESULT " + Json.write(r));
            if (failure != null) break;
        }
        doc.put("finished_at", now());
        doc.put("ok", ok && failure == null);
        if (failure != null) doc.put("failure", failure);
        try {
            writeAtomically(out, Json.write(doc) + "\n");
        } catch (IOException | RuntimeException e) {
            String line = "SPA_BENCH_FAILED cannot write " + out + ": " + e.getMessage();
            log.error(line);
            return line;
        }
        if (failure != null) {
            String line = "SPA_BENCH_FAILED " + failure + " (result file: " + out.getAbsolutePath() + ")";
            log.error(line);
            return line;
        }
        String line = "SPA_BENCH_DONE " + out.getAbsolutePath();
        log.info(line);
        return line;
    }

    /** Writes {@code text} to {@code file + ".tmp"}, syncs, and renames it over {@code file}. */
    public static void writeAtomically(File file, String text) throws IOException {
        File parent = file.getAbsoluteFile().getParentFile();
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

    public static String now() {
        SimpleDateFormat f = new SimpleDateFormat("yyyy-MM-dd'T'HH:mm:ss'Z'", Locale.US);
        f.setTimeZone(TimeZone.getTimeZone("UTC"));
        return f.format(new Date());
    }
}
