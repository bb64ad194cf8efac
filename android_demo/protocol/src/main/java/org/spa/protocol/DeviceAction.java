package org.spa.protocol;

/** What the device must compute next: run the gate on f, the side network on the taps, or the proof of a side token. */
public abstract class DeviceAction {
    public final long pos;

    DeviceAction(long pos) {
        this.pos = pos;
    }

    /** Gate position `pos` on its gate row, then call {@link DeviceSession#gated}. */
    public static final class RunGate extends DeviceAction {
        public final float[] f; // [hidden_size]
        public final Float margin; // the step's logit margin where the hello asked for it, else null

        RunGate(long pos, float[] f, Float margin) {
            super(pos);
            this.f = f;
            this.margin = margin;
        }

        /** What the plugin's gate reads: f, then the margin for a margin gate (the hello asked for margins). */
        public float[] row() {
            if (margin == null) return f;
            float[] row = java.util.Arrays.copyOf(f, f.length + 1);
            row[f.length] = margin;
            return row;
        }
    }

    /**
     * Compute s_pos from the decoded taps, then call {@link DeviceSession#sideOutput}: with
     * {@link PluginExecutor#side}, or {@link PluginExecutor#sideProjected} when {@code projected}.
     */
    public static final class RunSide extends DeviceAction {
        public final float[][] taps; // [n_taps][hidden_size]; [n_taps][r] when projected
        public final boolean projected; // the cloud applied the per-tap projections (hello.projection)

        RunSide(long pos, float[][] taps, boolean projected) {
            super(pos);
            this.taps = taps;
            this.projected = projected;
        }
    }

    /**
     * A settling session's proof: the greedy token of lm_head(norm(f + s)) if provably the
     * gateway's ({@link OutputHead#certify}); then call {@link DeviceSession#certified}.
     */
    public static final class RunHead extends DeviceAction {
        public final float[] f; // the exact f_pos [hidden_size], from the gateway
        public final float[] s; // the side output as the gateway decodes it [hidden_size]

        RunHead(long pos, float[] f, float[] s) {
            super(pos);
            this.f = f;
            this.s = s;
        }
    }
}
