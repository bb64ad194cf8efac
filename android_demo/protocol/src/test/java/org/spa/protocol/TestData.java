package org.spa.protocol;

import java.io.File;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/** Shared helpers: where the repository's test vectors are, hex, deep equality of message maps. */
final class TestData {
    private TestData() {}

    /** The repository root: -Dspa.repo, else the first parent of the working directory holding tests/vectors. */
    static File repo() {
        String prop = System.getProperty("spa.repo");
        if (prop != null) return new File(prop);
        File dir = new File(System.getProperty("user.dir")).getAbsoluteFile();
        for (File d = dir; d != null; d = d.getParentFile()) {
            if (new File(d, "tests/vectors/codec_vectors.json").isFile()) return d;
        }
        throw new IllegalStateException("cannot find tests/vectors above " + dir + "; pass -Dspa.repo=ROOT");
    }

    static File vectors(String name) {
        return new File(new File(repo(), "tests/vectors"), name);
    }

    static Map<String, Object> json(String name) throws IOException {
        return Json.parseObject(Files2.readUtf8(vectors(name)));
    }

    static byte[] hex(String s) {
        byte[] b = new byte[s.length() / 2];
        for (int i = 0; i < b.length; i++) b[i] = (byte) Integer.parseInt(s.substring(2 * i, 2 * i + 2), 16);
        return b;
    }

    static String toHex(byte[] b) {
        StringBuilder sb = new StringBuilder();
        for (byte x : b) sb.append(String.format("%02x", x & 0xff));
        return sb.toString();
    }

    static float[] f32(String hex) {
        ByteBuffer b = ByteBuffer.wrap(hex(hex)).order(ByteOrder.LITTLE_ENDIAN);
        float[] out = new float[b.remaining() / 4];
        for (int i = 0; i < out.length; i++) out[i] = b.getFloat();
        return out;
    }

    static double f64(String hex) {
        return ByteBuffer.wrap(hex(hex)).order(ByteOrder.LITTLE_ENDIAN).getDouble();
    }

    static float[][] matrix(float[] flat, int rows, int cols) {
        float[][] m = new float[rows][cols];
        for (int r = 0; r < rows; r++) System.arraycopy(flat, r * cols, m[r], 0, cols);
        return m;
    }

    static float[][] randomStates(long seed, int rows, int cols) {
        java.util.Random rng = new java.util.Random(seed);
        float[][] x = new float[rows][cols];
        for (float[] row : x) {
            for (int c = 0; c < cols; c++) row[c] = (float) (rng.nextGaussian() * 15);
            row[3 % cols] = 2100.5f;
            row[(cols / 2) % cols] = -1875.25f;
        }
        return x;
    }

    /** Structural equality of unpacked msgpack values (byte[] by content, numbers by value). */
    static boolean deepEquals(Object a, Object b) {
        if (a == null || b == null) return a == b;
        if (a instanceof byte[] && b instanceof byte[]) return Arrays.equals((byte[]) a, (byte[]) b);
        if (a instanceof Number && b instanceof Number) {
            boolean fa = a instanceof Double || a instanceof Float, fb = b instanceof Double || b instanceof Float;
            if (fa || fb) return ((Number) a).doubleValue() == ((Number) b).doubleValue();
            return ((Number) a).longValue() == ((Number) b).longValue();
        }
        if (a instanceof List && b instanceof List) {
            List<?> x = (List<?>) a, y = (List<?>) b;
            if (x.size() != y.size()) return false;
            for (int i = 0; i < x.size(); i++) if (!deepEquals(x.get(i), y.get(i))) return false;
            return true;
        }
        if (a instanceof Map && b instanceof Map) {
            Map<?, ?> x = (Map<?, ?>) a, y = (Map<?, ?>) b;
            if (!x.keySet().equals(y.keySet())) return false;
            for (Object k : x.keySet()) if (!deepEquals(x.get(k), y.get(k))) return false;
            return true;
        }
        return a.equals(b);
    }

    /** A mutable copy of a map (one level), with entries replaced: key, value, key, value... */
    static Map<String, Object> with(Map<String, Object> d, Object... kv) {
        Map<String, Object> m = new LinkedHashMap<String, Object>(d);
        for (int i = 0; i < kv.length; i += 2) m.put((String) kv[i], kv[i + 1]);
        return m;
    }

    static List<Object> list(Object... xs) {
        return new ArrayList<Object>(Arrays.asList(xs));
    }
}
