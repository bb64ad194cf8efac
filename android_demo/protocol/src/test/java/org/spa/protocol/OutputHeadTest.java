package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;

/** OutputHead on tiny heads this test writes itself (tests/android/test_java_output_head.py checks the
 *  real SmolLM2 head against Python's). */
public class OutputHeadTest {
    private static final int V = 6, H = 8;

    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    // --- a small safetensors writer: F32, U8 and I64 tensors and string metadata ------------------------

    private static final class Tensors {
        final Map<String, String> dtypes = new LinkedHashMap<String, String>();
        final Map<String, long[]> shapes = new LinkedHashMap<String, long[]>();
        final Map<String, byte[]> data = new LinkedHashMap<String, byte[]>();
        final Map<String, String> meta = new LinkedHashMap<String, String>();

        Tensors put(String name, String dtype, long[] shape, byte[] bytes) {
            dtypes.put(name, dtype);
            shapes.put(name, shape);
            data.put(name, bytes);
            return this;
        }

        Tensors f32(String name, float[] v, long... shape) {
            ByteBuffer b = ByteBuffer.allocate(4 * v.length).order(ByteOrder.LITTLE_ENDIAN);
            for (float x : v) b.putFloat(x);
            return put(name, "F32", shape, b.array());
        }

        Tensors i64(String name, long[] v) {
            ByteBuffer b = ByteBuffer.allocate(8 * v.length).order(ByteOrder.LITTLE_ENDIAN);
            for (long x : v) b.putLong(x);
            return put(name, "I64", new long[] {v.length}, b.array());
        }

        byte[] bytes() {
            Map<String, Object> header = new LinkedHashMap<String, Object>();
            header.put("__metadata__", meta);
            long offset = 0;
            for (String name : dtypes.keySet()) {
                Map<String, Object> info = new LinkedHashMap<String, Object>();
                info.put("dtype", dtypes.get(name));
                info.put("shape", shapes.get(name));
                List<Object> offsets = new ArrayList<Object>();
                offsets.add(offset);
                offset += data.get(name).length;
                offsets.add(offset);
                info.put("data_offsets", offsets);
                header.put(name, info);
            }
            byte[] head = Json.write(header).getBytes(StandardCharsets.UTF_8);
            int pad = (8 - head.length % 8) % 8;
            ByteBuffer b = ByteBuffer.allocate(8 + head.length + pad + (int) offset).order(ByteOrder.LITTLE_ENDIAN);
            b.putLong(head.length + pad).put(head);
            for (int i = 0; i < pad; i++) b.put((byte) ' ');
            for (byte[] d : data.values()) b.put(d);
            return b.array();
        }
    }

    /** A head as spa.model.output_head.OutputHead.save writes it: token v's piece is the letter 'A' + v. */
    private static Tensors head(float[] weight, String softcap, String scale, float[] bias) {
        Random rng = new Random(7);
        float[] norm = new float[H];
        for (int i = 0; i < H; i++) norm[i] = (float) (1 + 0.1 * rng.nextGaussian());
        byte[] pieces = new byte[V];
        long[] lengths = new long[V];
        for (int v = 0; v < V; v++) {
            pieces[v] = (byte) ('A' + v);
            lengths[v] = 1;
        }
        Tensors t = new Tensors().i64("piece_lengths", lengths).f32("norm_weight", norm, H).f32("weight", weight, V, H)
                .put("piece_bytes", "U8", new long[] {V}, pieces);
        if (bias != null) t.f32("bias", bias, V);
        t.meta.put("eps", "1e-06");
        t.meta.put("norm_offset", "0.0");
        t.meta.put("softcap", softcap);
        t.meta.put("scale", scale);
        t.meta.put("fingerprint", "toy");
        return t;
    }

    private static float[] weight(long seed) {
        Random rng = new Random(seed);
        float[] w = new float[V * H];
        for (int i = 0; i < w.length; i++) w[i] = (float) rng.nextGaussian();
        return w;
    }

    private File write(Tensors t) throws IOException {
        return write(t.bytes());
    }

    private File write(byte[] bytes) throws IOException {
        File f = tmp.newFile();
        FileOutputStream out = new FileOutputStream(f);
        try {
            out.write(bytes);
        } finally {
            out.close();
        }
        return f;
    }

    private static float[] row(float[] w, int v, float times) {
        float[] x = new float[H];
        for (int i = 0; i < H; i++) x[i] = w[v * H + i] * times;
        return x;
    }

    // --- the proof ------------------------------------------------------------------------------------

    @Test
    public void aClearCaseIsProvenAndIsTheArgmax() throws IOException {
        float[] w = weight(1);
        OutputHead head = OutputHead.load(write(head(w, "None", "None", null)));
        assertEquals(V, head.vocabSize);
        assertEquals(H, head.hiddenSize);
        assertEquals("toy", head.fingerprint);
        for (int v = 0; v < V; v++) {
            // x along row v: z_v = |W_v| |x| (norm weights near 1), another row rarely comes close
            float[] f = row(w, v, 3f), s = row(w, v, 0.5f);
            double[] z = referenceLogits(head, w, f, s);
            int want = 0;
            for (int t = 1; t < V; t++) if (z[t] > z[want]) want = t;
            OutputHead.Certified c = head.certify(f, s);
            assertEquals(want, c.best);
            assertEquals(Integer.valueOf(want), c.token);
            assertTrue(c.toString(), c.slack > 0 && c.gap > 0);
        }
    }

    @Test
    public void anExactTieIsNotProven() throws IOException {
        float[] w = weight(2);
        for (int i = 0; i < H; i++) w[H + i] = w[i] = 3 * w[i]; // rows 0 and 1 identical, and the largest
        OutputHead head = OutputHead.load(write(head(w, "None", "None", null)));
        OutputHead.Certified c = head.certify(row(w, 0, 1f), new float[H]);
        assertEquals(0, c.best); // the first of the tied, as numpy's argmax
        assertNull(c.toString(), c.token);
        assertEquals(0.0, c.gap, 0.0);
        assertTrue(c.toString(), c.slack <= 0);
        // rows within rounding of each other: not proven either
        for (int i = 0; i < H; i++) w[H + i] = w[i] * (1 + 1e-7f);
        head = OutputHead.load(write(head(w, "None", "None", null)));
        c = head.certify(row(w, 0, 1f), new float[H]);
        assertTrue(c.best == 0 || c.best == 1);
        assertNull(c.toString(), c.token);
    }

    @Test
    public void softcapScaleBiasAndChunkedMappingsGiveTheSameAnswers() throws IOException {
        float[] w = weight(3), bias = new float[V];
        for (int v = 0; v < V; v++) bias[v] = 0.25f * v;
        File plain = write(head(w, "None", "None", null)), capped = write(head(w, "30.0", "0.125", bias));
        OutputHead[] heads = {OutputHead.load(plain), OutputHead.load(plain, 2 * 4 * H), OutputHead.load(plain, 1),
                              OutputHead.load(capped), OutputHead.load(capped, 4 * 4 * H)};
        Random rng = new Random(5);
        int proven = 0;
        for (int k = 0; k < 20; k++) {
            float[] f = new float[H], s = new float[H];
            for (int i = 0; i < H; i++) {
                f[i] = (float) (rng.nextGaussian() * 20);
                s[i] = (float) (rng.nextGaussian() * 5);
            }
            OutputHead.Certified a = heads[0].certify(f, s), b = heads[1].certify(f, s), c = heads[2].certify(f, s);
            assertEquals(a.toString(), b.toString()); // chunks of 2 rows, of 1 row: the same numbers
            assertEquals(a.toString(), c.toString());
            OutputHead.Certified d = heads[3].certify(f, s), e = heads[4].certify(f, s);
            assertEquals(d.toString(), e.toString());
            double[] z = referenceLogits(heads[3], w, f, s);
            int want = 0;
            for (int t = 0; t < V; t++) {
                z[t] = (Math.tanh((z[t] + bias[t]) / 30.0) * 30.0) * 0.125;
                if (z[t] > z[want]) want = t;
            }
            assertEquals(want, d.best);
            assertTrue(d.token == null || d.token == want);
            proven += a.token != null && d.token != null ? 1 : 0;
        }
        assertTrue("proven " + proven, proven >= 15);
    }

    /** lm_head(norm(f + s)) in double from the test's own copy of the weight (norm as the head's, float32). */
    private static double[] referenceLogits(OutputHead head, float[] w, float[] f, float[] s) {
        float[] x = new float[H];
        for (int i = 0; i < H; i++) x[i] = f[i] + s[i];
        float[] y = head.normalized(x);
        double[] z = new double[V];
        for (int v = 0; v < V; v++) for (int i = 0; i < H; i++) z[v] += (double) w[v * H + i] * y[i];
        return z;
    }

    @Test
    public void piecesAreTheTokensBytes() throws IOException {
        OutputHead head = OutputHead.load(write(head(weight(4), "None", "None", null)));
        for (int v = 0; v < V; v++) assertArrayEquals(new byte[] {(byte) ('A' + v)}, head.piece(v));
        try {
            head.piece(V);
            fail();
        } catch (IndexOutOfBoundsException expected) {
            // a token outside the vocabulary
        }
    }

    // --- bad files ------------------------------------------------------------------------------------

    private void assertRefused(byte[] bytes, String... words) throws IOException {
        File f = write(bytes);
        try {
            OutputHead.load(f);
            fail("loaded a bad head");
        } catch (IOException e) {
            String m = e.getMessage();
            assertTrue(m, m.contains(f.getPath()));
            for (String word : words) assertTrue(m + " lacks " + word, m.contains(word));
        }
    }

    @Test
    public void badFilesAreRefusedWithTheirFault() throws IOException {
        Tensors t = head(weight(5), "None", "None", null);
        t.dtypes.remove("norm_weight");
        t.shapes.remove("norm_weight");
        t.data.remove("norm_weight");
        assertRefused(t.bytes(), "norm_weight", "missing");

        byte[] good = head(weight(5), "None", "None", null).bytes();
        assertRefused(Arrays.copyOf(good, good.length - 5), "truncated");
        assertRefused(Arrays.copyOf(good, 6), "too short");
        assertRefused(Arrays.copyOf(good, 40), "header");

        t = head(weight(5), "None", "None", null);
        t.dtypes.put("piece_lengths", "F64");
        assertRefused(t.bytes(), "piece_lengths", "F64", "expected I64");

        t = head(weight(5), "None", "None", null);
        t.shapes.put("weight", new long[] {V * H});
        t.data.put("weight", Arrays.copyOf(t.data.get("weight"), 4 * V * H));
        assertRefused(t.bytes(), "weight", "shape");

        t = head(weight(5), "None", "None", null);
        t.shapes.put("weight", new long[] {V, H + 1}); // the shape says more bytes than the offsets hold
        assertRefused(t.bytes(), "weight", "data offsets");

        t = head(weight(5), "None", "None", null);
        t.meta.remove("eps");
        assertRefused(t.bytes(), "metadata", "eps");

        try {
            OutputHead.load(new File(tmp.getRoot(), "absent.safetensors"));
            fail();
        } catch (IOException e) {
            assertTrue(e.getMessage(), e.getMessage().contains("absent.safetensors"));
        }
    }

    @Test
    public void cachedPathIsPythonsHeadPath() {
        File alnum = OutputHead.cachedPath("580502fb88eada35");
        assertEquals("580502fb88eada35.safetensors", alnum.getName());
        assertEquals("heads", alnum.getParentFile().getName());
        assertEquals("c14cddc033f64b9dea80ea675cf280a0.safetensors", OutputHead.cachedPath("a/b").getName()); // sha256[:32]
        assertEquals("x\u00b2.safetensors", OutputHead.cachedPath("x\u00b2").getName()); // Python: 'x²'.isalnum()
        String env = System.getenv("SPA_CACHE_DIR");
        if (env != null && !env.isEmpty()) assertEquals(new File(env), alnum.getParentFile().getParentFile());
    }
}
