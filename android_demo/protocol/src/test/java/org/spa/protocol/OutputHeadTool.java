package org.spa.protocol;

import java.io.File;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Random;

/**
 * A test peer for tests/android/test_java_output_head.py: Java's OutputHead on a real head file.
 *
 * <pre>
 * java ... org.spa.protocol.OutputHeadTool certify HEAD CASES
 *     CASES: float32 LE, case after case, each f [H] then s [H]; prints one JSON line per case:
 *     {"token": int or null, "best", "gap", "slack"}, then {"vocab_size", "hidden_size", "fingerprint", "load_ms"}
 * java ... org.spa.protocol.OutputHeadTool bench HEAD N
 *     N certifies of random states after a warm-up; prints {"load_ms", "ms_per_certify", ...}
 * </pre>
 */
public final class OutputHeadTool {
    private OutputHeadTool() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 3 || !(args[0].equals("certify") || args[0].equals("bench"))) {
            System.err.println("usage: OutputHeadTool certify HEAD CASES | bench HEAD N");
            System.exit(2);
        }
        long t0 = System.nanoTime();
        OutputHead head = OutputHead.load(new File(args[1]));
        double loadMs = (System.nanoTime() - t0) / 1e6;
        int h = head.hiddenSize;
        Map<String, Object> info = new LinkedHashMap<String, Object>();
        info.put("vocab_size", head.vocabSize);
        info.put("hidden_size", h);
        info.put("fingerprint", head.fingerprint);
        info.put("load_ms", loadMs);
        if (args[0].equals("certify")) {
            ByteBuffer b = ByteBuffer.wrap(Files2.readBytes(new File(args[2]))).order(ByteOrder.LITTLE_ENDIAN);
            if (b.remaining() % (8 * h) != 0) throw new IllegalArgumentException("cases file is not a whole number of (f, s) pairs");
            while (b.hasRemaining()) {
                float[] f = new float[h], s = new float[h];
                for (int i = 0; i < h; i++) f[i] = b.getFloat();
                for (int i = 0; i < h; i++) s[i] = b.getFloat();
                OutputHead.Certified c = head.certify(f, s);
                Map<String, Object> out = new LinkedHashMap<String, Object>();
                out.put("token", c.token);
                out.put("best", c.best);
                out.put("gap", c.gap);
                out.put("slack", c.slack);
                System.out.println(Json.write(out));
            }
        } else {
            int n = Integer.parseInt(args[2]);
            Random rng = new Random(0);
            float[][] fs = new float[8][h], ss = new float[8][h];
            for (int k = 0; k < 8; k++) {
                for (int i = 0; i < h; i++) {
                    fs[k][i] = (float) (rng.nextGaussian() * 20);
                    ss[k][i] = (float) (rng.nextGaussian() * 5);
                }
            }
            int proven = 0;
            for (int k = 0; k < Math.max(5, n / 4); k++) head.certify(fs[k % 8], ss[k % 8]); // warm-up (JIT)
            long t1 = System.nanoTime();
            for (int k = 0; k < n; k++) proven += head.certify(fs[k % 8], ss[k % 8]).token != null ? 1 : 0;
            info.put("certifies", n);
            info.put("proven", proven);
            info.put("ms_per_certify", (System.nanoTime() - t1) / 1e6 / n);
        }
        System.out.println(Json.write(info));
    }
}
