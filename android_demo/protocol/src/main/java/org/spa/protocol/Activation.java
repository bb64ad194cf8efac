package org.spa.protocol;

import java.util.Map;

/** An activation as it travels (the encoded map) and as it was decoded (float32 [rows][cols]). */
public final class Activation {
    public final Object encoded;
    public final float[][] values;

    public Activation(Object encoded, float[][] values) {
        this.encoded = encoded;
        this.values = values;
    }

    /** Encode `x` and keep what the receiver will decode (so both sides see the same numbers). */
    public static Activation of(float[][] x, String scheme, int outliers) {
        Map<String, Object> enc = ActivationCodec.encode(x, scheme, outliers);
        try {
            return new Activation(enc, ActivationCodec.decode(enc));
        } catch (ProtocolException e) { // our own encoder produced an invalid map: a bug
            throw new IllegalStateException(e);
        }
    }

    public int rows() {
        return values.length;
    }

    public int cols() {
        return values[0].length;
    }
}
