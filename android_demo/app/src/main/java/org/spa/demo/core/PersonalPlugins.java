package org.spa.demo.core;

import java.io.File;
import java.io.IOException;

import org.spa.protocol.HostPluginExecutor;
import org.spa.protocol.PluginConfig;

/**
 * The plugin the phone learned, for a session: the store's current version run by the pure-Java
 * {@link HostPluginExecutor} on its plugin.safetensors. (The app's ExecuTorch Module API of this
 * runtime loads no external weights file, and the exported .pte holds the weights it was exported
 * with; the training program's generation methods need one. The host executor computes the same
 * float32 arithmetic: tests/vectors/plugin_vectors.)
 */
public final class PersonalPlugins {
    private PersonalPlugins() {}

    /** Whether a plugin path names a personal plugin store (a directory with CURRENT). */
    public static boolean isStore(String path) {
        return new File(path, PersonalStore.CURRENT).isFile();
    }

    public static SessionRunner.Plugin load(String storePath) throws IOException {
        final File version = new PersonalStore(new File(storePath)).current();
        final HostPluginExecutor executor = HostPluginExecutor.load(version);
        return new HostPlugin(executor);
    }

    /** A HostPluginExecutor as a session's plugin (nothing native to free). */
    static final class HostPlugin implements SessionRunner.Plugin {
        private final HostPluginExecutor executor;

        HostPlugin(HostPluginExecutor executor) {
            this.executor = executor;
        }

        @Override
        public PluginConfig config() {
            return executor.config;
        }

        @Override
        public float gate(float[] row) {
            return executor.gate(row);
        }

        @Override
        public boolean gateReadsMargin() {
            return executor.gateReadsMargin();
        }

        @Override
        public float[] side(float[][] taps) {
            return executor.side(taps);
        }

        @Override
        public float[] sideProjected(float[][] projected) {
            return executor.sideProjected(projected);
        }

        @Override
        public GateWeights gateWeights() {
            return executor.gateWeights();
        }

        @Override
        public ProjectionWeights projectionWeights() {
            return executor.projectionWeights();
        }

        @Override
        public void close() {}
    }
}
