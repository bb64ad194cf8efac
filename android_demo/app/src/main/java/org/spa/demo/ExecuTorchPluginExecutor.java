package org.spa.demo;

import java.nio.charset.StandardCharsets;

import org.pytorch.executorch.EValue;
import org.pytorch.executorch.Module;
import org.pytorch.executorch.Tensor;
import org.spa.demo.core.NativeModules;
import org.spa.demo.core.SessionRunner;
import org.spa.protocol.PluginConfig;

/**
 * The reader's plugin run by ExecuTorch on the phone CPU (XNNPACK-delegated .pte
 * from `spa export`). Methods, as export/lowering.py lowers them:
 * <pre>
 *   gate(f: float32[1, H])             -> p: float32[1, 1]   ([1, H + 1] for a margin gate: f, then m)
 *   side(taps: float32[1, n_taps, H])  -> s: float32[1, H]
 *   plugin_config()                    -> uint8[n]  (the plugin's config.json, UTF-8)
 * </pre>
 * Not thread-safe: use it from one thread (the session thread).
 */
public final class ExecuTorchPluginExecutor implements SessionRunner.Plugin {
    public final PluginConfig config;
    private final Module module;
    private final int hidden, nTaps;

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
        Module module = Module.load(ptePath);
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
        Tensor in = Tensor.fromBlob(row, new long[] {1, width});
        return module.execute("gate", EValue.from(in))[0].toTensor().getDataAsFloatArray()[0];
    }

    @Override
    public boolean gateReadsMargin() {
        return config.gateMargin;
    }

    @Override
    public float[] side(float[][] taps) {
        float[] flat = new float[nTaps * hidden];
        for (int i = 0; i < nTaps; i++) System.arraycopy(taps[i], 0, flat, i * hidden, hidden);
        Tensor in = Tensor.fromBlob(flat, new long[] {1, nTaps, hidden});
        return module.execute("side", EValue.from(in))[0].toTensor().getDataAsFloatArray();
    }

    @Override
    public void close() {
        module.destroy();
    }
}
