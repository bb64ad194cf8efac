package org.spa.demo.core;

import java.util.ArrayList;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;

import org.spa.protocol.ClientException;
import org.spa.protocol.Commit;
import org.spa.protocol.GatewayClient;
import org.spa.protocol.Messages;
import org.spa.protocol.PluginConfig;
import org.spa.protocol.PluginExecutor;
import org.spa.protocol.SessionResult;

/** Stand-ins for ExecuTorch and the gateway, for the app logic's JUnit tests. */
final class Fakes {
    private Fakes() {}

    static PluginConfig config(String hash) {
        return PluginConfig.parse("{\"backbone\": {\"name\": \"fake\", \"fingerprint\": \"fp\", \"num_layers\": 4, \"hidden_size\": 8},"
                + " \"taps\": [0, 2], \"rank\": 2, \"side_scale\": 1.0, \"tau\": 0.5, \"content_hash\": \"" + hash + "\"}");
    }

    /** A plugin whose gate/side may throw what the test sets. */
    static final class Plugin implements SessionRunner.Plugin {
        final String path;
        volatile Throwable gateThrows;
        volatile boolean closed;

        Plugin(String path) {
            this.path = path;
        }

        @Override
        public PluginConfig config() {
            return Fakes.config("hash-" + path.hashCode());
        }

        @Override
        public float gate(float[] f) {
            Throwable t = gateThrows;
            if (t instanceof Error) throw (Error) t;
            if (t instanceof RuntimeException) throw (RuntimeException) t;
            return 0.1f;
        }

        @Override
        public float[] side(float[][] taps) {
            return new float[8];
        }

        @Override
        public void close() {
            closed = true;
        }
    }

    static final class Loader implements SessionRunner.PluginLoader {
        final List<Plugin> loaded = Collections.synchronizedList(new ArrayList<Plugin>());
        volatile Throwable loadThrows;
        volatile Throwable gateThrows;
        volatile CountDownLatch gate; // when set, load() waits for it (a slow native load)
        final CountDownLatch loading = new CountDownLatch(1);

        @Override
        public SessionRunner.Plugin load(String path) throws Exception {
            loading.countDown();
            if (gate != null) gate.await();
            Throwable t = loadThrows;
            if (t instanceof Error) throw (Error) t;
            if (t instanceof Exception) throw (Exception) t;
            Plugin p = new Plugin(path);
            p.gateThrows = gateThrows;
            loaded.add(p);
            return p;
        }
    }

    /** A gateway that commits `tokens` tokens, calling the plugin's gate for each. */
    static final class Connector implements SessionRunner.Connector {
        final List<String> urls = Collections.synchronizedList(new ArrayList<String>());
        volatile int tokens = 3;
        volatile CountDownLatch running; // when set, run() waits for cancel
        volatile boolean cancelled;
        volatile boolean runStarted; // run() began: the connection is attached to its session

        @Override
        public SessionRunner.Connection connect(String url, final PluginExecutor executor, Messages.Plugin plugin, double tau, String token) {
            urls.add(url);
            return new SessionRunner.Connection() {
                @Override
                public SessionResult run(String prompt, Messages.Options options, GatewayClient.Listener listener) throws ClientException {
                    runStarted = true;
                    SessionResult r = new SessionResult();
                    for (int i = 0; i < tokens; i++) {
                        executor.gate(new float[8]);
                        if (listener != null) listener.onCommit(new Commit(i, 100 + i, new byte[] {'a'}, i % 2 == 1), "a");
                        r.tokens.add(100L + i);
                    }
                    CountDownLatch wait = running;
                    if (wait != null) {
                        try {
                            wait.await();
                        } catch (InterruptedException e) {
                            throw new ClientException("interrupted");
                        }
                        if (cancelled) throw new ClientException("cancelled");
                    }
                    r.finishReason = "max_tokens";
                    r.text = "aaa";
                    return r;
                }

                @Override
                public void cancel() {
                    cancelled = true;
                    CountDownLatch wait = running;
                    if (wait != null) wait.countDown();
                }
            };
        }
    }

    /** Records what the runner shows. */
    static final class Ui implements SessionRunner.Ui {
        final List<String> statuses = Collections.synchronizedList(new ArrayList<String>());
        final StringBuilder text = new StringBuilder();
        volatile String failure;
        volatile Throwable cause;
        volatile SessionResult done;
        final CountDownLatch ended = new CountDownLatch(1);

        @Override
        public void status(String message) {
            statuses.add(message);
        }

        @Override
        public synchronized void commit(String piece, boolean sigma) {
            text.append(sigma ? piece.toUpperCase() : piece);
        }

        @Override
        public void done(SessionResult result) {
            done = result;
        }

        @Override
        public void failed(String message, Throwable t) {
            failure = message;
            cause = t;
        }

        @Override
        public void ended() {
            ended.countDown();
        }

        String lastStatus() {
            return statuses.isEmpty() ? null : statuses.get(statuses.size() - 1);
        }
    }
}
