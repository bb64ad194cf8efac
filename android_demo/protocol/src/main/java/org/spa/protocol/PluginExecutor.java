package org.spa.protocol;

/**
 * Runs a reader's plugin on the device: the gate on f_t and the side network on
 * the taps T_t. On the phone ExecuTorch runs the exported .pte; on a host the
 * pure-Java {@link HostPluginExecutor} computes the same math from the weights.
 *
 * The optional parts (pushed taps, the cloud-side projection) read what the device uploads
 * from the plugin itself, as the .pte's constant methods hold it (export/lowering.py); a plugin
 * that cannot say throws UnsupportedOperationException with a message for the user.
 */
public interface PluginExecutor {
    /**
     * p_t for the gate's input row ({@link DeviceAction.RunGate#row}): softmax(M_c rms(f))[1] for
     * f [hidden_size], or softmax(M_c [rms(f); log(1 + m)])[1] for a margin gate's row [f, m]
     * (hidden_size + 1 values); sigma_t = p_t > tau.
     */
    float gate(float[] row);

    /** Whether the gate reads the backbone's logit margin (config gate_input "rms_normalized_f+log_margin"). */
    default boolean gateReadsMargin() {
        return false;
    }

    /** s_t [hidden_size] from taps [n_taps][hidden_size], in the plugin's tap order. */
    float[] side(float[][] taps);

    /**
     * s_t [hidden_size] from the cloud's per-tap projections d [n_taps][r] (the .pte's
     * `side_projected`: the side network after its first layer; docs/PROTOCOL.md section 4).
     */
    default float[] sideProjected(float[][] projected) {
        throw new UnsupportedOperationException("this plugin has no side_projected method; export it again");
    }

    /** The gate's M_c and bias as the .pte's `gate_weight`/`gate_bias` hold them (what hello.gate uploads). */
    default GateWeights gateWeights() {
        throw new UnsupportedOperationException("this plugin cannot upload its gate (no gate_weight method); export it again");
    }

    /** The per-tap projections as `projection_weight`/`projection_bias` hold them (what hello.projection uploads). */
    default ProjectionWeights projectionWeights() {
        throw new UnsupportedOperationException("this plugin has no projection_weight method; export it again");
    }

    /** M_c float32 [2][width] flattened row-major (width = H, or H + 1 for a margin gate), bias float32 [2]. */
    final class GateWeights {
        public final float[] weight, bias;

        public GateWeights(float[] weight, float[] bias) {
            this.weight = weight;
            this.bias = bias;
        }
    }

    /** W_in, then each Down_l: float16 bits [n_taps][r][H] row-major, bias float32 [n_taps][r]. */
    final class ProjectionWeights {
        public final int rank;
        public final short[] weightHalf;
        public final float[] bias;

        public ProjectionWeights(int rank, short[] weightHalf, float[] bias) {
            this.rank = rank;
            this.weightHalf = weightHalf;
            this.bias = bias;
        }
    }
}
