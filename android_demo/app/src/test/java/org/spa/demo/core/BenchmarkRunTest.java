package org.spa.demo.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;
import org.spa.protocol.Files2;
import org.spa.protocol.Json;

/** Benchmark mode's run (BenchmarkRun): failures reach the host through logcat and the result file. */
public class BenchmarkRunTest {
    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    static final class Log implements BenchmarkRun.Log {
        final List<String> lines = new ArrayList<String>();

        @Override
        public void info(String line) {
            lines.add("I " + line);
        }

        @Override
        public void error(String line) {
            lines.add("E " + line);
        }
    }

    private static Map<String, Object> header() {
        Map<String, Object> h = new LinkedHashMap<String, Object>();
        h.put("schema", "spa-android-bench/1");
        h.put("iterations", 5);
        return h;
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> read(File f) throws Exception {
        return (Map<String, Object>) Json.parse(Files2.readUtf8(f));
    }

    @Test
    public void aNativeErrorLogsSpaBenchFailedAndStillWritesTheResultFile() throws Exception {
        File out = new File(tmp.getRoot(), "files/bench.json");
        Log log = new Log();
        final List<String> measured = new ArrayList<String>();
        String last = BenchmarkRun.execute(header(), Arrays.asList("/a.pte", "/b.pte"), new BenchmarkRun.Job() {
            @Override
            public Map<String, Object> run(String item) {
                measured.add(item);
                throw new ExceptionInInitializerError(new UnsatisfiedLinkError("dlopen failed: libfbjni.so"));
            }
        }, out, log);
        assertTrue(last, last.startsWith("SPA_BENCH_FAILED The ExecuTorch native runtime could not be loaded"));
        assertEquals("E " + last, log.lines.get(log.lines.size() - 1));
        assertEquals("the run stops at the first native failure", Arrays.asList("/a.pte"), measured);
        Map<String, Object> doc = read(out);
        assertEquals(Boolean.FALSE, doc.get("ok"));
        assertTrue(String.valueOf(doc.get("failure")).contains("libfbjni.so"));
        assertFalse(new File(out.getPath() + ".tmp").exists());
    }

    @Test
    public void anExceptionForOnePteIsItsErrorRowAndTheRunCompletes() throws Exception {
        File out = new File(tmp.getRoot(), "bench.json");
        Log log = new Log();
        String last = BenchmarkRun.execute(header(), Arrays.asList("/bad.pte", "/good.pte"), new BenchmarkRun.Job() {
            @Override
            public Map<String, Object> run(String item) {
                if (item.equals("/bad.pte")) throw new IllegalStateException("loadMethod(\"gate\") failed with ExecuTorch error 0x12");
                Map<String, Object> r = new LinkedHashMap<String, Object>();
                r.put("pte", item);
                r.put("error", null);
                return r;
            }
        }, out, log);
        assertEquals("SPA_BENCH_DONE " + out.getAbsolutePath(), last);
        Map<String, Object> doc = read(out);
        assertEquals(Boolean.FALSE, doc.get("ok"));
        List<?> results = (List<?>) doc.get("results");
        assertEquals(2, results.size());
        assertTrue(String.valueOf(((Map<?, ?>) results.get(0)).get("error")).contains("0x12"));
        assertTrue(log.lines.get(0).startsWith("I SPA_BENCH_RESULT "));
    }

    @Test
    public void anUnwritableResultIsReportedAsFailed() throws Exception {
        File blocker = tmp.newFile("not-a-dir");
        Log log = new Log();
        String last = BenchmarkRun.execute(header(), new ArrayList<String>(), new BenchmarkRun.Job() {
            @Override
            public Map<String, Object> run(String item) {
                return new LinkedHashMap<String, Object>();
            }
        }, new File(blocker, "bench.json"), log);
        assertTrue(last, last.startsWith("SPA_BENCH_FAILED cannot write"));
    }

    @Test
    public void onlyOneRunAtATime() {
        assertTrue(BenchmarkRun.claim());
        try {
            assertTrue(BenchmarkRun.active());
            assertFalse("a re-created activity must not start a second benchmark", BenchmarkRun.claim());
        } finally {
            BenchmarkRun.finish();
        }
        assertTrue(BenchmarkRun.claim());
        BenchmarkRun.finish();
    }

    @Test
    public void resultsGoOnlyUnderTheAppsFolders() throws Exception {
        File files = tmp.newFolder("Android", "data", "org.spa.demo", "files");
        File fallback = new File(files, "bench.json");
        assertEquals(fallback.getCanonicalPath(), OutputPaths.resolve(null, fallback, files).getPath());
        assertEquals(new File(files, "x/b.json").getCanonicalPath(),
                OutputPaths.resolve(files.getPath() + "/x/b.json", fallback, files).getPath());
        for (String bad : new String[] {tmp.getRoot() + "/elsewhere.json", files.getPath() + "/../../other/x.json", files.getPath()}) {
            try {
                OutputPaths.resolve(bad, fallback, files, null);
                throw new AssertionError("accepted " + bad);
            } catch (java.io.IOException expected) {
                assertTrue(expected.getMessage(), expected.getMessage().contains("benchmark results go under"));
            }
        }
    }
}
