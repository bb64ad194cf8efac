package org.spa.protocol;

/**
 * Runs a reader's plugin on the device: the gate on f_t and the side network on
 * the taps T_t. On the phone ExecuTorch runs the exported .pte; on a host the
 * pure-Java {@link HostPluginExecutor} computes the same math from the weights.
 */
public interface PluginExecutor {
    /** p_t = softmax(M_c rms(f))[1] for f [hidden_size]; sigma_t = p_t > tau. */
    float gate(float[] f);

    /** s_t [hidden_size] from taps [n_taps][hidden_size], in the plugin's tap order. */
    float[] side(float[][] taps);
}
