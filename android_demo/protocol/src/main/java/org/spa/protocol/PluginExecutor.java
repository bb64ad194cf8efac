package org.spa.protocol;

/**
 * Runs a reader's plugin on the device: the gate on f_t and the side network on
 * the taps T_t. On the phone ExecuTorch runs the exported .pte; on a host the
 * pure-Java {@link HostPluginExecutor} computes the same math from the weights.
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
}
