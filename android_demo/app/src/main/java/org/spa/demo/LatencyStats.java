package org.spa.demo;

import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.Map;

/** Summary of per-call latencies in milliseconds: median, p95, mean, min, max. */
final class LatencyStats {
    private LatencyStats() {}

    static Map<String, Object> of(long[] nanos) {
        double[] ms = new double[nanos.length];
        double sum = 0;
        for (int i = 0; i < nanos.length; i++) {
            ms[i] = nanos[i] / 1e6;
            sum += ms[i];
        }
        Arrays.sort(ms);
        Map<String, Object> d = new LinkedHashMap<String, Object>();
        d.put("median", percentile(ms, 50));
        d.put("p95", percentile(ms, 95));
        d.put("mean", sum / ms.length);
        d.put("min", ms[0]);
        d.put("max", ms[ms.length - 1]);
        d.put("calls", ms.length);
        return d;
    }

    /** Linear interpolation between closest ranks (numpy's default). */
    static double percentile(double[] sorted, double q) {
        double rank = q / 100.0 * (sorted.length - 1);
        int lo = (int) Math.floor(rank), hi = (int) Math.ceil(rank);
        return sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo);
    }
}
