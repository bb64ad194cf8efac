package org.spa.protocol;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;

/**
 * The optional `hello` uploads built from a plugin (docs/PROTOCOL.md section 4): `gate` for
 * pushed taps (the gateway predicts the gate and sends taps with the step) and `projection`
 * for the cloud-side projection (the gateway sends r values per tap instead of H). Both are
 * the plugin's own weights as little-endian bytes, exactly what the Python device sends
 * (device_runtime/client.py upload_gate, upload_projection).
 */
public final class PluginUploads {
    private PluginUploads() {}

    public static Messages.GateUpload gate(PluginExecutor plugin, double tau) {
        PluginExecutor.GateWeights w = plugin.gateWeights();
        return new Messages.GateUpload(floats(w.weight), floats(w.bias), tau);
    }

    public static Messages.Projection projection(PluginExecutor plugin) {
        PluginExecutor.ProjectionWeights w = plugin.projectionWeights();
        ByteBuffer b = ByteBuffer.allocate(2 * w.weightHalf.length).order(ByteOrder.LITTLE_ENDIAN);
        for (short h : w.weightHalf) b.putShort(h);
        return new Messages.Projection(w.rank, b.array(), floats(w.bias));
    }

    static byte[] floats(float[] x) {
        ByteBuffer b = ByteBuffer.allocate(4 * x.length).order(ByteOrder.LITTLE_ENDIAN);
        for (float v : x) b.putFloat(v);
        return b.array();
    }
}
