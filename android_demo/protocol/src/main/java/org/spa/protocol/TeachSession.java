package org.spa.protocol;

import java.util.ArrayList;
import java.util.List;

/**
 * The device's side of a teaching connection without I/O (docs/PROTOCOL.md section 6,
 * "Teaching"; the Python twin is device_runtime/teach_client.py): the `teach` of each example,
 * and the `states` answering it checked and joined into one {@link ExampleStates}. The plugin's
 * weights never enter a message: only the example's text and the plugin's identity go up.
 */
public final class TeachSession {
    /** The backbone's states at the summary positions of one example, as decoded. */
    public static final class ExampleStates {
        public final float[][][] x; // [n][taps][H] raw taps, or [n][taps][r] the cloud's projections d
        public final float[][] f; // [n][H]
        public final long[] targets; // [n] the summary tokens (EOS last)
        public final float[] margins; // [n] or null

        ExampleStates(float[][][] x, float[][] f, long[] targets, float[] margins) {
            this.x = x;
            this.f = f;
            this.targets = targets;
            this.margins = margins;
        }

        public int rows() {
            return targets.length;
        }
    }

    private final Messages.Plugin plugin;
    private final String token, codec;
    private final int outliers, hidden, cols;
    private final boolean margin;
    private final Messages.Projection projection;
    private final List<TeachMessages.States> received = new ArrayList<TeachMessages.States>();

    /**
     * @param cols columns of the taps that come down: H, or r with the cloud-side projection
     * @param projection the cloud-side projection (its weights, or its hash), or null for raw taps
     */
    public TeachSession(Messages.Plugin plugin, String token, String codec, int outliers, boolean margin, int hidden,
                        int cols, Messages.Projection projection) {
        this.plugin = plugin;
        this.token = token == null ? "" : token;
        this.codec = codec;
        this.outliers = outliers;
        this.margin = margin;
        this.hidden = hidden;
        this.cols = cols;
        this.projection = projection;
    }

    /** The message asking for one example's states (the prompt built from the plugin's template). */
    public TeachMessages.Teach teach(String prompt, String summary) {
        received.clear();
        return new TeachMessages.Teach(token, plugin, prompt, summary, codec, outliers, margin, projection);
    }

    /** Checks one `states` message; the example's states once the last row arrived, else null. */
    public ExampleStates receive(TeachMessages.States msg) throws ProtocolException {
        int nTaps = plugin.taps.length, rows = msg.targets.length, done = 0;
        for (TeachMessages.States r : received) done += r.targets.length;
        TeachMessages.States first = received.isEmpty() ? msg : received.get(0);
        if (msg.first != done || msg.total != first.total || msg.promptTokens != first.promptTokens) {
            throw new ProtocolException("out_of_order", "states.first " + msg.first + " after " + done + " rows (total "
                    + msg.total + ")");
        }
        if (rows < 1 || done + rows > msg.total) {
            throw new ProtocolException("bad_field", "states.targets: " + rows + " rows where " + (msg.total - done) + " remain");
        }
        if (msg.f.rows() != rows || msg.f.cols() != hidden) {
            throw new ProtocolException("bad_field", "states.f: expected [" + rows + ", " + hidden + "]");
        }
        if (msg.taps.rows() != rows * nTaps || msg.taps.cols() != cols) {
            throw new ProtocolException("bad_field", "states.taps: expected [" + rows * nTaps + ", " + cols + "]");
        }
        if (margin != (msg.margins != null) || (margin && msg.margins.length != rows)) {
            throw new ProtocolException("bad_field", "states.margins: one per row with teach.margin, else none");
        }
        received.add(msg);
        if (done + rows < msg.total) return null;
        int n = (int) msg.total;
        float[][][] x = new float[n][][];
        float[][] f = new float[n][];
        long[] targets = new long[n];
        float[] margins = margin ? new float[n] : null;
        int i = 0;
        for (TeachMessages.States r : received) {
            for (int k = 0; k < r.targets.length; k++, i++) {
                x[i] = new float[nTaps][];
                for (int t = 0; t < nTaps; t++) x[i][t] = r.taps.values[k * nTaps + t];
                f[i] = r.f.values[k];
                targets[i] = r.targets[k];
                if (margins != null) margins[i] = r.margins[k];
            }
        }
        received.clear();
        return new ExampleStates(x, f, targets, margins);
    }
}
