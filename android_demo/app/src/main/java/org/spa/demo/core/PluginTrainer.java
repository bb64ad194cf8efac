package org.spa.demo.core;

import java.io.File;
import java.util.List;
import java.util.Map;

import org.spa.protocol.TeachSession;

/**
 * Learns a plugin's new weights from its user's examples on the phone. The app's implementation
 * runs the training program in ExecuTorch (org.spa.demo.ExecuTorchTrainer: TrainingModule and
 * SGD); the JVM tests use a stand-in.
 */
public interface PluginTrainer {
    /** What a run learned: weights by state-dict name, the gate threshold, a record for the config. */
    final class Learned {
        public final Map<String, float[]> weights;
        public final double tau;
        public final Map<String, Object> record;

        public Learned(Map<String, float[]> weights, double tau, Map<String, Object> record) {
            this.weights = weights;
            this.tau = tau;
            this.record = record;
        }
    }

    interface Progress {
        void step(int done, int total);
    }

    /**
     * @param program the training program (plugin-train.pte)
     * @param weights the weights file to start from (the current version's plugin-train.ptd)
     * @param tau the current gate threshold
     */
    Learned learn(File program, File weights, List<TeachSession.ExampleStates> examples, double tau, Progress progress)
            throws Exception;
}
