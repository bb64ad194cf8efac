package org.spa.protocol;

import java.io.File;
import java.io.IOException;
import java.util.Map;

/**
 * The plugin in pure Java, from an export (or plugin) directory's config.json and
 * plugin.safetensors: exactly spa/model/plugin.py's forward pass in float32.
 *
 * <pre>
 *   side: x_l = rms(T_l); z = W_in x_0; z = Down_l(x_l) + Adapter_l(gelu(z)) for l = 1..;
 *         s = scale * W_out gelu(z)
 *   gate: p = softmax(M_c rms(f))[1], or softmax(M_c [rms(f); log(1 + m)])[1] for a margin gate
 * </pre>
 *
 * It stands in for ExecuTorch on hosts, where no phone exists; it agrees with
 * eager torch to float32 rounding (checked against tests/vectors/plugin_vectors). It also
 * gives what the .pte's constant methods give (gate_weight/gate_bias, projection_weight/
 * projection_bias) and its side_projected method, for pushed taps and the cloud-side projection.
 */
public final class HostPluginExecutor implements PluginExecutor {
    public final PluginConfig config;
    private final int hidden, rank, nTaps;
    private final float[] wIn, bIn, wOut, bOut, wGate, bGate;
    private final float[][] wDown, bDown, wAdapter, bAdapter;
    private final float scale;

    public HostPluginExecutor(PluginConfig config, Map<String, Safetensors.Tensor> weights) throws IOException {
        this.config = config;
        hidden = config.hiddenSize;
        rank = config.rank;
        nTaps = config.taps.length;
        wIn = take(weights, "side.w_in.weight", rank, hidden);
        bIn = take(weights, "side.w_in.bias", rank);
        wOut = take(weights, "side.w_out.weight", hidden, rank);
        bOut = take(weights, "side.w_out.bias", hidden);
        wGate = take(weights, "gate.classifier.weight", 2, hidden + (config.gateMargin ? 1 : 0));
        bGate = take(weights, "gate.classifier.bias", 2);
        wDown = new float[nTaps - 1][];
        bDown = new float[nTaps - 1][];
        wAdapter = new float[nTaps - 1][];
        bAdapter = new float[nTaps - 1][];
        for (int i = 0; i < nTaps - 1; i++) {
            wDown[i] = take(weights, "side.down." + i + ".weight", rank, hidden);
            bDown[i] = take(weights, "side.down." + i + ".bias", rank);
            wAdapter[i] = take(weights, "side.adapter." + i + ".weight", rank, rank);
            bAdapter[i] = take(weights, "side.adapter." + i + ".bias", rank);
        }
        // The buffer holds the scale actually used; the config records the same number.
        scale = weights.containsKey("side.scale") ? take(weights, "side.scale")[0] : config.sideScale;
    }

    /** Load `dir/config.json` and `dir/plugin.safetensors` (what `spa export` writes beside the .pte). */
    public static HostPluginExecutor load(File dir) throws IOException {
        File config = new File(dir, "config.json"), weights = new File(dir, "plugin.safetensors");
        if (!config.isFile()) throw new IOException(dir + " has no config.json (expected a plugin or export directory)");
        if (!weights.isFile()) throw new IOException(dir + " has no plugin.safetensors");
        return new HostPluginExecutor(PluginConfig.load(config), Safetensors.load(weights));
    }

    @Override
    public float gate(float[] row) {
        float[] x;
        if (!config.gateMargin) {
            checkLen(row.length, "f");
            x = PluginMath.rms(row);
        } else { // [rms(f); log(1 + m)]
            if (row.length != hidden + 1) {
                throw new IllegalArgumentException("gate row has " + row.length + " values, expected " + (hidden + 1));
            }
            x = java.util.Arrays.copyOf(PluginMath.rms(java.util.Arrays.copyOf(row, hidden)), hidden + 1);
            x[hidden] = (float) Math.log1p(row[hidden]);
        }
        float[] logits = PluginMath.linear(wGate, bGate, x, 2);
        return PluginMath.softmax2Second(logits[0], logits[1]);
    }

    @Override
    public boolean gateReadsMargin() {
        return config.gateMargin;
    }

    @Override
    public float[] side(float[][] taps) {
        if (taps.length != nTaps) throw new IllegalArgumentException("expected " + nTaps + " taps, got " + taps.length);
        for (float[] t : taps) checkLen(t.length, "tap");
        float[][] d = new float[nTaps][];
        d[0] = PluginMath.linear(wIn, bIn, PluginMath.rms(taps[0]), rank);
        for (int i = 0; i < nTaps - 1; i++) d[i + 1] = PluginMath.linear(wDown[i], bDown[i], PluginMath.rms(taps[i + 1]), rank);
        return mix(d);
    }

    /** The side network after its per-tap projections (spa/model/plugin.py SideNetwork.mix). */
    @Override
    public float[] sideProjected(float[][] projected) {
        if (projected.length != nTaps) throw new IllegalArgumentException("expected " + nTaps + " projections, got " + projected.length);
        for (float[] d : projected) {
            if (d.length != rank) throw new IllegalArgumentException("projection has " + d.length + " values, expected " + rank);
        }
        return mix(projected);
    }

    /** z = d_0; z = d_l + Adapter_l(gelu(z)); s = scale * W_out gelu(z). */
    private float[] mix(float[][] d) {
        float[] z = d[0].clone();
        for (int i = 0; i < nTaps - 1; i++) {
            float[] adapted = PluginMath.linear(wAdapter[i], bAdapter[i], PluginMath.gelu(z), rank);
            for (int j = 0; j < rank; j++) z[j] = d[i + 1][j] + adapted[j]; // float32 add, as torch
        }
        float[] s = PluginMath.linear(wOut, bOut, PluginMath.gelu(z), hidden);
        for (int j = 0; j < hidden; j++) s[j] = scale * s[j];
        return s;
    }

    /** gate.classifier, as export puts it into `gate_weight`/`gate_bias`. */
    @Override
    public GateWeights gateWeights() {
        return new GateWeights(wGate.clone(), bGate.clone());
    }

    /**
     * W_in then each Down_l narrowed to float16 (round to nearest even, as numpy's astype in
     * spa/model/projection.py), biases float32: the bits the .pte's `projection_weight` holds.
     */
    @Override
    public ProjectionWeights projectionWeights() {
        short[] w = new short[nTaps * rank * hidden];
        float[] b = new float[nTaps * rank];
        for (int t = 0; t < nTaps; t++) {
            float[] wt = t == 0 ? wIn : wDown[t - 1], bt = t == 0 ? bIn : bDown[t - 1];
            for (int i = 0; i < wt.length; i++) w[t * rank * hidden + i] = (short) Half.fromFloat(wt[i]);
            System.arraycopy(bt, 0, b, t * rank, rank);
        }
        return new ProjectionWeights(rank, w, b);
    }

    private void checkLen(int n, String what) {
        if (n != hidden) throw new IllegalArgumentException(what + " has " + n + " values, expected " + hidden);
    }

    private static float[] take(Map<String, Safetensors.Tensor> w, String name, long... shape) throws IOException {
        Safetensors.Tensor t = w.get(name);
        if (t == null) throw new IOException("plugin.safetensors lacks " + name + " (does it match config.json?)");
        if (!java.util.Arrays.equals(t.shape, shape)) {
            throw new IOException("plugin.safetensors: " + name + " has shape " + java.util.Arrays.toString(t.shape)
                    + ", expected " + java.util.Arrays.toString(shape));
        }
        return t.data;
    }
}
