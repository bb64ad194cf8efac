package org.spa.protocol;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Activation codec (docs/PROTOCOL.md section 5; reference spa/protocol/codec.py).
 *
 * Decoding is normative and bit-exact: one float32 multiply `(float) q * scale`
 * per value, then outliers overwrite their columns (fp16 -> fp32 is exact).
 * Encoding reproduces the Python encoder byte for byte (float32 arithmetic,
 * round half to even, stable choice of outliers), so the in-process reference
 * and the Java client send identical side outputs.
 */
public final class ActivationCodec {
    public static final int MAX_COLS = 1 << 16; // outlier indices are uint16
    public static final float FP16_MAX = 65504f;
    private static final String[] FIELDS = {"scheme", "shape", "q", "scale", "oidx", "oval", "odtype"};

    private ActivationCodec() {}

    public static boolean isScheme(Object s) {
        return "int8".equals(s) || "int4".equals(s) || "f32".equals(s);
    }

    static int levels(String scheme) {
        return "int8".equals(scheme) ? 127 : 7;
    }

    // ------------------------------------------------------------------ encode

    /** The map for `x` [rows][cols] (finite values), as spa.codec.encode builds it. */
    public static Map<String, Object> encode(float[][] x, String scheme, int outliers) {
        int rows = x.length;
        if (rows < 1) throw new IllegalArgumentException("expected at least one row");
        int cols = x[0].length;
        if (cols < 1 || cols > MAX_COLS) throw new IllegalArgumentException("expected 1 <= cols <= " + MAX_COLS);
        for (float[] row : x) {
            if (row.length != cols) throw new IllegalArgumentException("rows of different lengths");
            for (float v : row) {
                if (Float.isNaN(v) || Float.isInfinite(v)) throw new IllegalArgumentException("cannot encode non-finite values");
            }
        }
        if (!isScheme(scheme)) throw new IllegalArgumentException("unknown scheme " + scheme);
        if ("f32".equals(scheme)) {
            ByteBuffer q = le(4 * rows * cols);
            for (float[] row : x) for (float v : row) q.putFloat(v);
            return fields("f32", rows, cols, q.array(), new byte[0], new byte[0], new byte[0], "f16");
        }
        if (outliers < 0) throw new IllegalArgumentException("outliers must be >= 0");

        int k = Math.min(outliers, cols);
        int level = levels(scheme);
        int[][] idx = new int[rows][];
        float[][] oval = new float[rows][k];
        byte[][] q = new byte[rows][cols];
        ByteBuffer scale = le(4 * rows);
        boolean f32Outliers = false;
        for (int r = 0; r < rows; r++) {
            idx[r] = largestMagnitudes(x[r], k);
            float[] rest = x[r].clone();
            for (int i = 0; i < k; i++) {
                oval[r][i] = x[r][idx[r][i]];
                rest[idx[r][i]] = 0f;
                if (Math.abs(oval[r][i]) > FP16_MAX) f32Outliers = true;
            }
            float max = 0f;
            for (float v : rest) max = Math.max(max, Math.abs(v));
            float s = max / (float) level; // float32 division, as numpy does
            if (s == 0f) s = 1f; // all-zero row, or a max so small that /levels underflows
            scale.putFloat(s);
            for (int c = 0; c < cols; c++) {
                double v = Math.rint(rest[c] / s); // float32 division, then round half to even
                q[r][c] = (byte) Math.max(-level, Math.min(level, v));
            }
        }
        ByteBuffer oidx = le(2 * rows * k);
        ByteBuffer ovalBytes = le((f32Outliers ? 4 : 2) * rows * k);
        for (int r = 0; r < rows; r++) {
            for (int i = 0; i < k; i++) {
                oidx.putShort((short) idx[r][i]);
                if (f32Outliers) ovalBytes.putFloat(oval[r][i]);
                else ovalBytes.putShort((short) Half.fromFloat(oval[r][i]));
            }
        }
        byte[] qBytes = "int8".equals(scheme) ? flatten(q, cols) : packNibbles(q, cols);
        return fields(scheme, rows, cols, qBytes, scale.array(), oidx.array(), ovalBytes.array(), f32Outliers ? "f32" : "f16");
    }

    /** The k columns of largest |x|, lower index first among equal magnitudes, in ascending index order. */
    static int[] largestMagnitudes(float[] row, int k) {
        Integer[] order = new Integer[row.length];
        for (int i = 0; i < order.length; i++) order[i] = i;
        final float[] r = row;
        // Arrays.sort on objects is stable: equal magnitudes keep ascending index order.
        Arrays.sort(order, new java.util.Comparator<Integer>() {
            @Override
            public int compare(Integer a, Integer b) {
                return Float.compare(Math.abs(r[b]), Math.abs(r[a])); // descending magnitude
            }
        });
        int[] idx = new int[k];
        for (int i = 0; i < k; i++) idx[i] = order[i];
        Arrays.sort(idx);
        return idx;
    }

    private static byte[] flatten(byte[][] q, int cols) {
        byte[] out = new byte[q.length * cols];
        for (int r = 0; r < q.length; r++) System.arraycopy(q[r], 0, out, r * cols, cols);
        return out;
    }

    /** Two's complement nibbles, even column in the low nibble; an odd row ends in a 0 nibble. */
    private static byte[] packNibbles(byte[][] q, int cols) {
        int perRow = (cols + 1) / 2;
        byte[] out = new byte[q.length * perRow];
        for (int r = 0; r < q.length; r++) {
            for (int j = 0; j < perRow; j++) {
                int lo = q[r][2 * j] & 0x0f;
                int hi = 2 * j + 1 < cols ? q[r][2 * j + 1] & 0x0f : 0;
                out[r * perRow + j] = (byte) (lo | (hi << 4));
            }
        }
        return out;
    }

    private static Map<String, Object> fields(String scheme, int rows, int cols, byte[] q, byte[] scale,
                                              byte[] oidx, byte[] oval, String odtype) {
        Map<String, Object> d = new LinkedHashMap<String, Object>();
        d.put("scheme", scheme);
        List<Object> shape = new ArrayList<Object>();
        shape.add((long) rows);
        shape.add((long) cols);
        d.put("shape", shape);
        d.put("q", q);
        d.put("scale", scale);
        d.put("oidx", oidx);
        d.put("oval", oval);
        d.put("odtype", odtype);
        return d;
    }

    // ------------------------------------------------------------------ decode

    /** Decode and validate an encoded map; any defect is ProtocolException("bad_field"). */
    public static float[][] decode(Object encoded) throws ProtocolException {
        if (!(encoded instanceof Map)) throw bad("expected a map");
        Map<?, ?> d = (Map<?, ?>) encoded;
        StringBuilder missing = new StringBuilder();
        for (String f : FIELDS) {
            if (!d.containsKey(f)) missing.append(missing.length() == 0 ? "" : ", ").append(f);
        }
        if (missing.length() > 0) throw bad("missing " + missing);
        Object scheme = d.get("scheme"), odtype = d.get("odtype");
        if (!isScheme(scheme)) throw bad("unknown scheme " + scheme);
        if (!"f16".equals(odtype) && !"f32".equals(odtype)) throw bad("odtype must be 'f16' or 'f32', got " + odtype);
        int[] shape = checkedShape(d.get("shape"));
        int rows = shape[0], cols = shape[1];
        for (String name : new String[] {"q", "scale", "oidx", "oval"}) {
            if (!(d.get(name) instanceof byte[])) throw bad(name + " must be bytes");
        }
        byte[] q = (byte[]) d.get("q"), scaleB = (byte[]) d.get("scale");
        byte[] oidxB = (byte[]) d.get("oidx"), ovalB = (byte[]) d.get("oval");

        if ("f32".equals(scheme)) {
            expectLen("q", q, (long) rows * cols * 4);
            expectLen("scale", scaleB, 0);
            expectLen("oidx", oidxB, 0);
            expectLen("oval", ovalB, 0);
            ByteBuffer b = ByteBuffer.wrap(q).order(ByteOrder.LITTLE_ENDIAN);
            float[][] out = new float[rows][cols];
            for (int r = 0; r < rows; r++) for (int c = 0; c < cols; c++) out[r][c] = b.getFloat();
            return finite(out);
        }

        int[][] qv = unpackQ((String) scheme, q, rows, cols);
        expectLen("scale", scaleB, (long) rows * 4);
        ByteBuffer sb = ByteBuffer.wrap(scaleB).order(ByteOrder.LITTLE_ENDIAN);
        float[] scale = new float[rows];
        for (int r = 0; r < rows; r++) {
            scale[r] = sb.getFloat();
            if (!(scale[r] > 0f) || Float.isInfinite(scale[r])) throw bad("every scale must be finite and > 0");
        }
        if (oidxB.length % (2 * rows) != 0) {
            throw bad("oidx length " + oidxB.length + " is not a multiple of 2 * rows");
        }
        int k = oidxB.length / (2 * rows);
        if (k > cols) throw bad(k + " outliers per row but only " + cols + " columns");
        boolean f16 = "f16".equals(odtype);
        expectLen("oval", ovalB, (long) rows * k * (f16 ? 2 : 4));
        ByteBuffer ib = ByteBuffer.wrap(oidxB).order(ByteOrder.LITTLE_ENDIAN);
        ByteBuffer vb = ByteBuffer.wrap(ovalB).order(ByteOrder.LITTLE_ENDIAN);
        int[][] idx = new int[rows][k];
        float[][] oval = new float[rows][k];
        for (int r = 0; r < rows; r++) {
            for (int i = 0; i < k; i++) {
                idx[r][i] = ib.getShort() & 0xffff;
                oval[r][i] = f16 ? Half.toFloat(vb.getShort() & 0xffff) : vb.getFloat();
                if (idx[r][i] >= cols || (i > 0 && idx[r][i] <= idx[r][i - 1])) {
                    throw bad("outlier indices must be < cols and strictly ascending in each row");
                }
            }
        }
        float[][] out = new float[rows][cols];
        for (int r = 0; r < rows; r++) {
            float s = scale[r];
            for (int c = 0; c < cols; c++) out[r][c] = (float) qv[r][c] * s; // one binary32 multiply
            for (int i = 0; i < k; i++) out[r][idx[r][i]] = oval[r][i];
        }
        return finite(out);
    }

    private static int[][] unpackQ(String scheme, byte[] data, int rows, int cols) throws ProtocolException {
        int[][] q = new int[rows][cols];
        if ("int8".equals(scheme)) {
            expectLen("q", data, (long) rows * cols);
            for (int r = 0; r < rows; r++) {
                for (int c = 0; c < cols; c++) {
                    byte v = data[r * cols + c];
                    if (v == -128) throw bad("int8 value -128 is not allowed (range is -127..127)");
                    q[r][c] = v;
                }
            }
            return q;
        }
        int perRow = (cols + 1) / 2;
        expectLen("q", data, (long) rows * perRow);
        for (int r = 0; r < rows; r++) {
            for (int j = 0; j < perRow; j++) {
                int b = data[r * perRow + j] & 0xff;
                int lo = b & 0x0f, hi = b >>> 4;
                if (lo == 8 || hi == 8) throw bad("int4 value -8 is not allowed (range is -7..7)");
                q[r][2 * j] = lo > 7 ? lo - 16 : lo;
                if (2 * j + 1 < cols) q[r][2 * j + 1] = hi > 7 ? hi - 16 : hi;
                else if (hi != 0) throw bad("int4 padding nibble must be 0");
            }
        }
        return q;
    }

    private static int[] checkedShape(Object shape) throws ProtocolException {
        String why = "shape must be a list [rows >= 1, 1 <= cols <= " + MAX_COLS + "]";
        if (!(shape instanceof List) || ((List<?>) shape).size() != 2) throw bad(why);
        List<?> s = (List<?>) shape;
        if (!(s.get(0) instanceof Long) || !(s.get(1) instanceof Long)) throw bad(why);
        long rows = (Long) s.get(0), cols = (Long) s.get(1);
        if (rows < 1 || cols < 1 || cols > MAX_COLS) throw bad(why);
        // Java arrays cap the size; such a frame could not hold the bytes anyway.
        if (rows > (Integer.MAX_VALUE / 4) / cols) throw bad(why);
        return new int[] {(int) rows, (int) cols};
    }

    private static void expectLen(String name, byte[] data, long n) throws ProtocolException {
        if (data.length != n) throw bad(name + " has " + data.length + " bytes, expected " + n);
    }

    private static float[][] finite(float[][] out) throws ProtocolException {
        for (float[] row : out) {
            for (float v : row) {
                if (Float.isNaN(v) || Float.isInfinite(v)) throw bad("decoded values are not all finite");
            }
        }
        return out;
    }

    private static ByteBuffer le(int n) {
        return ByteBuffer.allocate(n).order(ByteOrder.LITTLE_ENDIAN);
    }

    private static ProtocolException bad(String message) {
        return new ProtocolException("bad_field", message);
    }
}
