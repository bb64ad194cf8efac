package org.spa.protocol;

/** What the device must compute next: run the gate on f, or the side network on the taps. */
public abstract class DeviceAction {
    public final long pos;

    DeviceAction(long pos) {
        this.pos = pos;
    }

    /** Gate position `pos` on its decoded f_pos, then call {@link DeviceSession#gated}. */
    public static final class RunGate extends DeviceAction {
        public final float[] f; // [hidden_size]

        RunGate(long pos, float[] f) {
            super(pos);
            this.f = f;
        }
    }

    /** Compute s_pos from the decoded taps, then call {@link DeviceSession#sideOutput}. */
    public static final class RunSide extends DeviceAction {
        public final float[][] taps; // [n_taps][hidden_size]

        RunSide(long pos, float[][] taps) {
            super(pos);
            this.taps = taps;
        }
    }
}
