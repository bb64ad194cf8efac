package org.spa.demo;

import java.nio.charset.StandardCharsets;

import org.pytorch.executorch.EValue;
import org.pytorch.executorch.Module;
import org.pytorch.executorch.Tensor;
import org.spa.demo.core.ExecuTorchErrors;
import org.spa.demo.core.NativeModules;
import org.spa.demo.core.SessionRunner;
import org.spa.protocol.Half;
import org.spa.protocol.PluginConfig;

/**
 * The reader's plugin run by ExecuTorch on the phone CPU (XNNPACK-delegated .pte
 * from `spa export`). Methods, as export/lowering.py lowers them:
 * <pre>
 *   gate(f: float32[1, H])             -> p: float32[1, 1]   ([1, H + 1] for a margin gate: f, then m)
 *   side(taps: float32[1, n_taps, H])  -> s: float32[1, H]
 *   side_projected(d: float32[1, n_taps, r]) -> s: float32[1, H]   (cloud-side projection; loaded on first use)
 *   plugin_config()                    -> uint8[n]  (the plugin's config.json, UTF-8)
 *   gate_weight(), gate_bias()         -> float32[2, width], float32[2]   (uploaded for pushed taps)
 *   projection_weight(), projection_bias() -> float16[n_taps, r, H], float32[n_taps, r]
 * </pre>
 * The native libraries are loaded first, in one place ({@link NativeRuntime}); ExecuTorch's
 * failures arrive as {@link ExecuTorchErrors.PluginRuntimeException} with the runtime's error code.
 * Not thread-safe: use it from one thread (the session thread).
 */
public final class ExecuTorchPluginExecutor implements SessionRunner.Plugin {
    public final PluginConfig config;
    private final Module module;
    private final int hidden, nTaps;
    private boolean sideProjectedLoaded;

    private ExecuTorchPluginExecutor(Module module, PluginConfig config) {
        this.module = module;
        this.config = config;
        this.hidden = config.hiddenSize;
        this.nTaps = config.taps.length;
    }

    /**
     * Load a .pte and its methods; the config comes from the program itself. Native trouble
     * (no libexecutorch.so for this ABI, a failed JNI_OnLoad) arrives as an Error: the callers
     * (SessionRunner, BenchmarkRun) catch Throwable and say what is missing.
     */
    public static ExecuTorchPluginExecutor load(String ptePath) {
        NativeRuntime.ensureLoaded();
        Module module;
        try {
            module = Module.load(ptePath);
        } catch (RuntimeException e) {
            throw ExecuTorchErrors.wrap("load " + ptePath, e);
        }
        try {
            NativeModules.loadMethod(module, "gate"); // checks loadMethod's error code where it returns one
            NativeModules.loadMethod(module, "side");
            return new ExecuTorchPluginExecutor(module, PluginConfig.parse(readConfig(module)));
        } catch (RuntimeException | Error e) {
            module.destroy();
            throw e;
        }
    }

    /** The config.json embedded by export as the constant method `plugin_config`. */
    public static String readConfig(Module module) {
        EValue[] out = module.execute("plugin_config");
        return new String(out[0].toTensor().getDataAsUnsignedByteArray(), StandardCharsets.UTF_8);
    }

    @Override
    public PluginConfig config() {
        return config;
    }

    @Override
    public float gate(float[] row) {
        int width = hidden + (config.gateMargin ? 1 : 0);
        if (row.length != width) throw new IllegalArgumentException("gate row has " + row.length + " values, expected " + width);
        return run("gate", Tensor.fromBlob(row, new long[] {1, width}))[0].toTensor().getDataAsFloatArray()[0];
    }

    @Override
    public boolean gateReadsMargin() {
        return config.gateMargin;
    }

    @Override
    public float[] side(float[][] taps) {
        float[] flat = new float[nTaps * hidden];
        for (int i = 0; i < nTaps; i++) System.arraycopy(taps[i], 0, flat, i * hidden, hidden);
        return run("side", Tensor.fromBlob(flat, new long[] {1, nTaps, hidden}))[0].toTensor().getDataAsFloatArray();
    }

    @Override
    public float[] sideProjected(float[][] projected) {
        int rank = config.rank;
        float[] flat = new float[nTaps * rank];
        for (int i = 0; i < nTaps; i++) System.arraycopy(projected[i], 0, flat, i * rank, rank);
        if (!sideProjectedLoaded) {
            NativeModules.loadMethod(module, "side_projected");
            sideProjectedLoaded = true;
        }
        return run("side_projected", Tensor.fromBlob(flat, new long[] {1, nTaps, rank}))[0].toTensor().getDataAsFloatArray();
    }

    @Override
    public GateWeights gateWeights() {
        return new GateWeights(constant("gate_weight").getDataAsFloatArray(), constant("gate_bias").getDataAsFloatArray());
    }

    @Override
    public ProjectionWeights projectionWeights() {
        Tensor weight = constant("projection_weight");
        short[] half;
        try {
            half = weight.getDataAsShortArray(); // float16 bits, as exported
        } catch (IllegalStateException | UnsupportedOperationException e) { // a runtime that widens float16
            float[] w = weight.getDataAsFloatArray();
            half = new short[w.length];
            for (int i = 0; i < w.length; i++) half[i] = (short) Half.fromFloat(w[i]); // exact: the values are float16
        }
        return new ProjectionWeights(config.rank, half, constant("projection_bias").getDataAsFloatArray());
    }

    /** A constant method's tensor (export/lowering.py); a .pte that predates it cannot upload it. */
    private Tensor constant(String method) {
        try {
            return run(method)[0].toTensor();
        } catch (ExecuTorchErrors.PluginRuntimeException e) {
            throw new UnsupportedOperationException("this .pte has no " + method + " method (export it again): " + e.getMessage());
        }
    }

    private EValue[] run(String method, Tensor... inputs) {
        EValue[] in = new EValue[inputs.length];
        for (int i = 0; i < inputs.length; i++) in[i] = EValue.from(inputs[i]);
        try {
            return module.execute(method, in);
        } catch (RuntimeException e) {
            throw ExecuTorchErrors.wrap("execute \"" + method + "\"", e);
        }
    }

    @Override
    public void close() {
        module.destroy();
    }
}
