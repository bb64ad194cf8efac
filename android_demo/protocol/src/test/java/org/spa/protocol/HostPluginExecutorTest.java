package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.util.List;
import java.util.Map;

import org.junit.Test;

/**
 * The pure-Java plugin against eager torch on tests/vectors/plugin_vectors.json
 * (tests/android/test_host.py checks the same file from Python). Tolerances, stated
 * in the file: |p_java - p_torch| <= 1e-6 and max|s_java - s_torch| <= 1e-5 * max|s_torch|.
 * Java rounds every op's output to float32 like torch, but sums in another order.
 */
public class HostPluginExecutorTest {
    @SuppressWarnings("unchecked")
    static Map<String, Object> vectors() throws Exception {
        return TestData.json("plugin_vectors.json");
    }

    static HostPluginExecutor executor() throws Exception {
        return HostPluginExecutor.load(TestData.vectors("plugin_vectors"));
    }

    @SuppressWarnings("unchecked")
    static double tolerance(String name) throws Exception {
        return ((Number) ((Map<String, Object>) vectors().get("tolerance")).get(name)).doubleValue();
    }

    @Test
    public void readsTheConfig() throws Exception {
        HostPluginExecutor ex = executor();
        assertEquals(576, ex.config.hiddenSize);
        assertArrayEquals(new int[] {0, 10, 20, 30}, ex.config.taps);
        assertEquals(vectors().get("content_hash"), ex.config.contentHash);
        assertEquals(0.5, ex.config.tau, 0);
        assertTrue(Prompts.forDocument(ex.config, "A  paper.").contains("A paper.\n\nSummarize this paper"));
    }

    @Test
    @SuppressWarnings("unchecked")
    public void gateMatchesEagerTorch() throws Exception {
        HostPluginExecutor ex = executor();
        double tol = tolerance("gate_abs"), worst = 0;
        for (Map<String, Object> c : (List<Map<String, Object>>) vectors().get("gate")) {
            float want = TestData.f32((String) c.get("p"))[0];
            float got = ex.gate(TestData.f32((String) c.get("f")));
            worst = Math.max(worst, Math.abs(got - want));
            assertEquals(want, got, tol);
        }
        System.out.println("gate: max |p_java - p_torch| = " + worst);
    }

    @Test
    @SuppressWarnings("unchecked")
    public void marginGateMatchesEagerTorch() throws Exception {
        HostPluginExecutor ex = HostPluginExecutor.load(TestData.vectors((String) vectors().get("margin_plugin_dir")));
        assertTrue(ex.config.gateMargin && ex.gateReadsMargin());
        assertTrue(!executor().gateReadsMargin());
        double tol = tolerance("gate_abs"), worst = 0;
        for (Map<String, Object> c : (List<Map<String, Object>>) vectors().get("margin_gate")) {
            float want = TestData.f32((String) c.get("p"))[0];
            float[] row = TestData.f32((String) c.get("row"));
            assertEquals(ex.config.hiddenSize + 1, row.length);
            float got = ex.gate(row);
            worst = Math.max(worst, Math.abs(got - want));
            assertEquals(want, got, tol);
        }
        System.out.println("margin gate: max |p_java - p_torch| = " + worst);
    }

    @Test
    @SuppressWarnings("unchecked")
    public void sideMatchesEagerTorch() throws Exception {
        HostPluginExecutor ex = executor();
        double rel = tolerance("side_rel_to_max_abs"), worst = 0;
        int nTaps = ex.config.taps.length, h = ex.config.hiddenSize;
        for (Map<String, Object> c : (List<Map<String, Object>>) vectors().get("side")) {
            float[] want = TestData.f32((String) c.get("s"));
            float[] got = ex.side(TestData.matrix(TestData.f32((String) c.get("taps")), nTaps, h));
            double maxAbs = 0, maxErr = 0;
            for (int i = 0; i < h; i++) {
                maxAbs = Math.max(maxAbs, Math.abs(want[i]));
                maxErr = Math.max(maxErr, Math.abs(got[i] - want[i]));
            }
            assertTrue("max|s| " + maxAbs + " should be well above 0", maxAbs > 1);
            worst = Math.max(worst, maxErr / maxAbs);
            assertTrue("side error " + maxErr + " > " + rel + " * " + maxAbs, maxErr <= rel * maxAbs);
        }
        System.out.println("side: max |s_java - s_torch| / max|s_torch| = " + worst);
    }

    @Test
    @SuppressWarnings("unchecked")
    public void erfMatchesPythonMathErf() throws Exception {
        double worst = 0;
        for (Map<String, Object> c : (List<Map<String, Object>>) vectors().get("erf")) {
            double x = TestData.f64((String) c.get("x")), want = TestData.f64((String) c.get("erf"));
            double err = Math.abs(PluginMath.erf(x) - want);
            worst = Math.max(worst, err);
            assertEquals("erf(" + x + ")", want, PluginMath.erf(x), 1e-15);
        }
        assertTrue(worst <= 1e-15);
        assertEquals(0.0, PluginMath.erf(0.0), 0);
        assertEquals(-PluginMath.erf(0.7), PluginMath.erf(-0.7), 0);
    }

    @Test
    public void geluIsExactErfGelu() {
        assertEquals(0f, PluginMath.gelu(0f), 0);
        assertEquals(0.8413447f, PluginMath.gelu(1f), 1e-7f); // 0.5 * (1 + erf(1/sqrt 2))
        assertEquals(-0.15865526f, PluginMath.gelu(-1f), 1e-7f);
        assertEquals(10f, PluginMath.gelu(10f), 0);
    }
}
