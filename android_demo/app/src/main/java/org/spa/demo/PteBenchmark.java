package org.spa.demo;

import java.io.File;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Random;

import android.os.Debug;

import org.pytorch.executorch.EValue;
import org.pytorch.executorch.Module;
import org.pytorch.executorch.Tensor;
import org.spa.demo.core.NativeModules;
import org.spa.protocol.PluginConfig;

/**
 * Measures one .pte on the phone: file size, load time (program + both methods),
 * per-call latency of `gate` and `side` (each call timed alone, after warm-up,
 * inputs built once so only ExecuTorch's execute and the output read are timed),
 * and memory. Inputs look like SmolLM2 states: N(0, 15) with a few channels
 * near 2000. The schema of the result is documented in android_demo/README.md.
 * A RuntimeException becomes this .pte's error; an Error (native trouble) propagates to
 * BenchmarkRun, which ends the run with SPA_BENCH_FAILED.
 */
final class PteBenchmark {
    private PteBenchmark() {}

    static Map<String, Object> run(String path, int iterations, int warmup) {
        Map<String, Object> r = new LinkedHashMap<String, Object>();
        r.put("pte", path);
        File file = new File(path);
        r.put("file_bytes", file.length());
        if (!file.isFile()) {
            r.put("error", "no such file (push it with adb, see android_demo/README.md)");
            return r;
        }
        boolean reset = ProcMemory.resetPeak();
        long rssBefore = ProcMemory.rssKb();
        Module module = null;
        try {
            NativeRuntime.ensureLoaded(); // ExecuTorch first, in one place; a 16 KB page refusal as one line
            long t0 = System.nanoTime();
            module = Module.load(path);
            NativeModules.loadMethod(module, "gate"); // its error code, where it returns one, is checked
            NativeModules.loadMethod(module, "side");
            r.put("load_ms", (System.nanoTime() - t0) / 1e6);
            PluginConfig config = PluginConfig.parse(ExecuTorchPluginExecutor.readConfig(module));
            int h = config.hiddenSize, n = config.taps.length;
            r.put("content_hash", config.contentHash);
            r.put("hidden_size", h);
            r.put("n_taps", n);

            Random rng = new Random(0);
            float[] row = states(rng, 1, h);
            if (config.gateMargin) { // a margin gate reads [f, m]
                row = java.util.Arrays.copyOf(row, h + 1);
                row[h] = 1f;
            }
            EValue f = EValue.from(Tensor.fromBlob(row, new long[] {1, row.length}));
            EValue taps = EValue.from(Tensor.fromBlob(states(rng, n, h), new long[] {1, n, h}));
            long[] gate = time(module, "gate", f, iterations, warmup);
            long[] side = time(module, "side", taps, iterations, warmup);
            r.put("gate_ms", LatencyStats.of(gate));
            r.put("side_ms", LatencyStats.of(side));
            // One output of each, to compare with the host (same inputs: java.util.Random(0)).
            r.put("gate_p", (double) module.execute("gate", f)[0].toTensor().getDataAsFloatArray()[0]);
            float[] s = module.execute("side", taps)[0].toTensor().getDataAsFloatArray();
            double maxAbs = 0;
            for (float v : s) maxAbs = Math.max(maxAbs, Math.abs(v));
            r.put("side_max_abs", maxAbs);
            r.put("rss_kb_before", rssBefore);
            r.put("rss_kb_after", ProcMemory.rssKb());
            r.put("peak_rss_kb", ProcMemory.peakRssKb());
            r.put("peak_rss_reset", reset);
            r.put("native_heap_kb", Debug.getNativeHeapAllocatedSize() / 1024);
            r.put("error", null);
        } catch (RuntimeException e) {
            r.put("error", String.valueOf(e));
        } finally {
            if (module != null) module.destroy();
        }
        return r;
    }

    private static long[] time(Module module, String method, EValue input, int iterations, int warmup) {
        for (int i = 0; i < warmup; i++) module.execute(method, input)[0].toTensor().getDataAsFloatArray();
        long[] t = new long[iterations];
        for (int i = 0; i < iterations; i++) {
            long t0 = System.nanoTime();
            module.execute(method, input)[0].toTensor().getDataAsFloatArray();
            t[i] = System.nanoTime() - t0;
        }
        return t;
    }

    private static float[] states(Random rng, int rows, int h) {
        float[] x = new float[rows * h];
        for (int i = 0; i < x.length; i++) x[i] = (float) (rng.nextGaussian() * 15);
        for (int r = 0; r < rows; r++) {
            for (int c : new int[] {3, 77, 300}) if (c < h) x[r * h + c] = (rng.nextBoolean() ? 1 : -1) * (1500 + 1000 * rng.nextFloat());
        }
        return x;
    }
}
