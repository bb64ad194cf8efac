package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.List;
import java.util.Map;

import org.junit.Test;

/** The activation codec against tests/vectors/codec_vectors.json (shared with Python), bit for bit. */
public class ActivationCodecTest {
    @SuppressWarnings("unchecked")
    private static List<Map<String, Object>> cases() throws Exception {
        return (List<Map<String, Object>>) TestData.json("codec_vectors.json").get("cases");
    }

    /** The encoded map of a vector case, with hex fields turned into bytes (as msgpack bin arrives). */
    private static Map<String, Object> encodedOf(Map<String, Object> c) {
        @SuppressWarnings("unchecked")
        Map<String, Object> e = TestData.with((Map<String, Object>) c.get("encoded"));
        for (String k : new String[] {"q", "scale", "oidx", "oval"}) e.put(k, TestData.hex((String) e.get(k)));
        return e;
    }

    private static int[] shape(Map<String, Object> c) {
        List<?> s = (List<?>) c.get("shape");
        return new int[] {((Number) s.get(0)).intValue(), ((Number) s.get(1)).intValue()};
    }

    @Test
    public void decodesEveryVectorBitExactly() throws Exception {
        List<Map<String, Object>> cases = cases();
        assertTrue(cases.size() >= 6);
        for (Map<String, Object> c : cases) {
            float[][] out = ActivationCodec.decode(encodedOf(c));
            int[] shape = shape(c);
            float[] expected = TestData.f32((String) c.get("decoded_f32"));
            assertEquals(shape[0], out.length);
            for (int r = 0; r < shape[0]; r++) {
                for (int col = 0; col < shape[1]; col++) {
                    int want = Float.floatToRawIntBits(expected[r * shape[1] + col]);
                    assertEquals(c.get("name") + " [" + r + "," + col + "]", want, Float.floatToRawIntBits(out[r][col]));
                }
            }
        }
    }

    @Test
    public void encodesEveryVectorLikeThePythonEncoder() throws Exception {
        for (Map<String, Object> c : cases()) {
            int[] shape = shape(c);
            float[][] x = TestData.matrix(TestData.f32((String) c.get("input_f32")), shape[0], shape[1]);
            Map<String, Object> got = ActivationCodec.encode(x, (String) c.get("scheme"), ((Number) c.get("outliers")).intValue());
            Map<String, Object> want = encodedOf(c);
            for (String k : new String[] {"scheme", "odtype"}) assertEquals(c.get("name") + " " + k, want.get(k), got.get(k));
            assertTrue(c.get("name") + " shape", TestData.deepEquals(want.get("shape"), got.get("shape")));
            for (String k : new String[] {"q", "scale", "oidx", "oval"}) {
                assertEquals(c.get("name") + " " + k, TestData.toHex((byte[]) want.get(k)), TestData.toHex((byte[]) got.get(k)));
            }
        }
    }

    @Test
    public void halfConversionIsExactBothWays() {
        for (int h = 0; h < 0x10000; h++) {
            float f = Half.toFloat(h);
            if (Float.isNaN(f)) continue;
            assertEquals("half " + Integer.toHexString(h), h, Half.fromFloat(f));
        }
        // Ties round to even; beyond 65504 + half an ulp is infinity; below 2^-25 is zero.
        assertEquals(0x3c00, Half.fromFloat(1f + 0x1p-11f)); // halfway between 1 and the next half: even (1)
        assertEquals(0x3c02, Half.fromFloat(1f + 3 * 0x1p-11f)); // halfway, odd below: rounds up
        assertEquals(0x7bff, Half.fromFloat(65519f));
        assertEquals(0x7c00, Half.fromFloat(65520f));
        assertEquals(0x0000, Half.fromFloat(0x1p-25f)); // tie between 0 and the smallest subnormal: even
        assertEquals(0x0001, Half.fromFloat(Math.nextUp(0x1p-25f)));
        assertEquals(0x8000, Half.fromFloat(-0f));
        assertEquals(0x0400, Half.fromFloat(0x1p-14f - 0x1p-26f)); // rounds up into the smallest normal
    }

    @Test
    public void roundTripsRealisticStatesClosely() throws Exception {
        float[][] x = TestData.randomStates(1, 4, 576);
        for (String scheme : new String[] {"int8", "int4", "f32"}) {
            float[][] y = ActivationCodec.decode(ActivationCodec.encode(x, scheme, 8));
            double tol = scheme.equals("f32") ? 0 : scheme.equals("int8") ? 0.5 : 8;
            for (int r = 0; r < 4; r++) {
                assertEquals(2100.5f, y[r][3], 1f); // outliers go separately
                for (int c = 0; c < 576; c++) assertEquals(x[r][c], y[r][c], tol);
            }
        }
    }

    private static void assertRejected(String why, Map<String, Object> enc) {
        try {
            ActivationCodec.decode(enc);
            fail("accepted: " + why);
        } catch (ProtocolException e) {
            assertEquals(why, "bad_field", e.code);
        }
    }

    @Test
    public void rejectsMalformedMaps() throws Exception {
        Map<String, Object> good = ActivationCodec.encode(TestData.randomStates(2, 1, 9), "int8", 2);
        ActivationCodec.decode(good);
        Map<String, Object> missing = TestData.with(good);
        missing.remove("oval");
        assertRejected("missing oval", missing);
        assertRejected("scheme", TestData.with(good, "scheme", "int2"));
        assertRejected("odtype", TestData.with(good, "odtype", "bf16"));
        assertRejected("shape type", TestData.with(good, "shape", TestData.list(1L, 9.0)));
        assertRejected("shape rows", TestData.with(good, "shape", TestData.list(0L, 9L)));
        assertRejected("shape cols", TestData.with(good, "shape", TestData.list(1L, 65537L)));
        assertRejected("q as str", TestData.with(good, "q", "abc"));
        byte[] q = ((byte[]) good.get("q")).clone();
        q[0] = -128;
        assertRejected("int8 -128", TestData.with(good, "q", q));
        assertRejected("q length", TestData.with(good, "q", new byte[8]));
        assertRejected("zero scale", TestData.with(good, "scale", new byte[4]));
        assertRejected("nan scale", TestData.with(good, "scale", new byte[] {0, 0, (byte) 0xc0, 0x7f}));
        assertRejected("oidx not ascending", TestData.with(good, "oidx", new byte[] {4, 0, 3, 0}));
        assertRejected("oidx out of range", TestData.with(good, "oidx", new byte[] {4, 0, 9, 0}));
        assertRejected("oidx odd length", TestData.with(good, "oidx", new byte[] {4, 0, 3}));
        assertRejected("oval length", TestData.with(good, "oval", new byte[2]));
        assertRejected("inf outlier", TestData.with(good, "oval", new byte[] {0, 0x7c, 0, 0x3c}));
        assertRejected("huge scale", TestData.with(good, "scale", new byte[] {(byte) 0xff, (byte) 0xff, 0x7f, 0x7f}));
        assertRejected("not a map", null);

        Map<String, Object> int4 = ActivationCodec.encode(TestData.randomStates(3, 1, 9), "int4", 2);
        ActivationCodec.decode(int4);
        byte[] q4 = ((byte[]) int4.get("q")).clone();
        q4[4] = (byte) (q4[4] | 0x10); // the padding nibble of a 9-column row
        assertRejected("padding nibble", TestData.with(int4, "q", q4));
        q4 = ((byte[]) int4.get("q")).clone();
        q4[0] = (byte) ((q4[0] & 0xf0) | 0x08);
        assertRejected("int4 -8", TestData.with(int4, "q", q4));
        Map<String, Object> f32 = ActivationCodec.encode(TestData.randomStates(4, 1, 9), "f32", 0);
        assertRejected("f32 with a scale", TestData.with(f32, "scale", new byte[4]));
        assertArrayEquals(TestData.randomStates(4, 1, 9)[0], ActivationCodec.decode(f32)[0], 0f);
    }

    @Test
    public void outlierChoicePrefersLowerIndexOnTies() {
        int[] idx = ActivationCodec.largestMagnitudes(new float[] {0.5f, -3, 3, 0, 3, -0.25f, 1, 2, -2}, 2);
        assertArrayEquals(new int[] {1, 2}, idx);
    }
}
