package org.spa.demo.core;

import java.io.Closeable;
import java.io.File;
import java.util.ArrayList;
import java.util.List;

import org.spa.protocol.ClientException;
import org.spa.protocol.Commit;
import org.spa.protocol.GatewayClient;
import org.spa.protocol.Messages;
import org.spa.protocol.PluginConfig;
import org.spa.protocol.PluginExecutor;
import org.spa.protocol.Prompts;
import org.spa.protocol.SessionResult;

/**
 * One reader's summaries, outliving the activity that shows them: MainActivity keeps one runner
 * per process and attaches its screen to it, so a rotation (or any other re-creation of the
 * activity) neither cancels the running summary nor starts a second session with a second
 * plugin Module. What it guarantees:
 * <ul>
 *   <li>at most one session runs ({@link #start} refuses a second);
 *   <li>Stop works in every phase: while the plugin loads (native loading cannot be interrupted,
 *       so the session ends as soon as the load returns, before connecting), while connecting and
 *       while generating;
 *   <li>any Throwable of the worker — an UnsatisfiedLinkError or ExceptionInInitializerError from
 *       the native runtime as well as a RuntimeException — ends the session with a shown,
 *       explained error instead of killing the process;
 *   <li>the loaded plugin is reused only for the same file: same path, size and modification
 *       time (a .pte pushed again over the old one, or a newly picked one, is loaded afresh) and
 *       is closed when replaced, after a fatal runtime error, and on {@link #release}.
 * </ul>
 * The {@link Ui} is called on the session thread; Android implementations post to the UI thread.
 */
public final class SessionRunner {
    /** A loaded plugin: its executor and config; close() frees the native program. */
    public interface Plugin extends PluginExecutor, Closeable {
        PluginConfig config();
    }

    public interface PluginLoader {
        Plugin load(String path) throws Exception;
    }

    /** One gateway session (GatewayClient in the app). */
    public interface Connection {
        SessionResult run(String prompt, Messages.Options options, GatewayClient.Listener listener) throws ClientException;

        void cancel();
    }

    public interface Connector {
        Connection connect(String url, PluginExecutor executor, Messages.Plugin plugin, double tau, String token);
    }

    public interface Ui {
        void status(String message);

        void commit(String piece, boolean sigma);

        void done(SessionResult result);

        void failed(String message, Throwable cause);

        /** The session is over (after done or failed, or a stop); the Summarize button comes back. */
        void ended();
    }

    /** What the reader asked for. */
    public static final class Request {
        public String document = "";
        public String ptePath = "";
        public String url = "";
        public String token = "";
        public Double tau; // null: the plugin's
        public Messages.Options options = new Messages.Options();
    }

    /** A committed piece of the summary, kept so a re-created screen can redraw it. */
    public static final class Piece {
        public final String text;
        public final boolean sigma;

        Piece(String text, boolean sigma) {
            this.text = text;
            this.sigma = sigma;
        }
    }

    private static final Ui NO_UI = new Ui() {
        @Override public void status(String message) {}
        @Override public void commit(String piece, boolean sigma) {}
        @Override public void done(SessionResult result) {}
        @Override public void failed(String message, Throwable cause) {}
        @Override public void ended() {}
    };

    private final PluginLoader loader;
    private final Connector connector;
    private volatile Ui ui = NO_UI;
    private Thread thread;
    private boolean active; // a session runs (set by start, cleared by its thread's last step)
    private SessionControl control;
    private Plugin plugin; // touched by the session thread, and by release() once none runs
    private String pluginKey;
    private boolean released;
    private String lastStatus = "";
    private final List<Piece> transcript = new ArrayList<Piece>();

    public SessionRunner(PluginLoader loader, Connector connector) {
        this.loader = loader;
        this.connector = connector;
    }

    /** Shows this runner's state on {@code ui} (null: none) and replays the summary so far. */
    public void attach(Ui newUi) {
        List<Piece> pieces;
        String status;
        synchronized (this) {
            pieces = new ArrayList<Piece>(transcript);
            status = lastStatus;
        }
        Ui target = newUi == null ? NO_UI : newUi;
        for (Piece p : pieces) target.commit(p.text, p.sigma);
        target.status(status);
        ui = target;
    }

    /** Stops showing on {@code screen}, if it is the one attached (an older screen going away leaves a newer one). */
    public void detach(Ui screen) {
        if (ui == screen) ui = NO_UI;
    }

    public synchronized boolean running() {
        return active;
    }

    /** Starts a summary; false (and nothing happens) if one is running or the runner was released. */
    public synchronized boolean start(final Request request) {
        if (active || released) return false;
        active = true;
        transcript.clear();
        control = new SessionControl();
        final SessionControl c = control;
        thread = new Thread(new Runnable() {
            @Override
            public void run() {
                runSession(request, c);
            }
        }, "spa-session");
        thread.start();
        return true;
    }

    /** Stop: cancels the running session in whatever phase it is. */
    public void stop() {
        SessionControl c;
        synchronized (this) {
            c = control;
        }
        if (c != null && !c.isCancelled()) {
            c.cancel();
            status("Stopping…");
        }
    }

    /** The screen is gone for good: stop, and free the plugin once no session uses it. */
    public void release() {
        boolean idle;
        synchronized (this) {
            released = true;
            idle = !active; // else the session's thread closes it when it ends
        }
        stop();
        if (idle) closePlugin();
        ui = NO_UI;
    }

    /** Waits for the running session's thread (tests, and onDestroy with a bound). */
    public void join(long millis) throws InterruptedException {
        Thread t;
        synchronized (this) {
            t = thread;
        }
        if (t != null) t.join(millis);
    }

    private void runSession(Request r, SessionControl c) {
        try {
            status("Loading the plugin…");
            Plugin p = pluginFor(r.ptePath);
            if (c.isCancelled()) {
                status("Stopped before connecting.");
                return;
            }
            PluginConfig config = p.config();
            String warning = Sidecar.check(r.ptePath, config);
            double threshold = r.tau != null ? r.tau : config.tau;
            status("Connecting… (plugin " + config.contentHash + ", tau " + threshold
                    + (warning == null ? "" : "; " + warning) + ")");
            Connection conn = connector.connect(r.url, p, config.helloPlugin(), threshold, r.token);
            if (!c.attach(conn)) {
                status("Stopped before connecting.");
                return;
            }
            SessionResult result = conn.run(Prompts.forDocument(config, r.document), r.options, new GatewayClient.Listener() {
                @Override
                public void onCommit(Commit commit, String piece) {
                    synchronized (SessionRunner.this) {
                        transcript.add(new Piece(piece, commit.sigma));
                    }
                    ui.commit(piece, commit.sigma);
                }
            });
            status("Done (" + result.finishReason + "). Highlighted: tokens chosen with the side network.");
            ui.done(result);
        } catch (ClientException e) {
            if (c.isCancelled()) {
                status("Stopped.");
            } else {
                status(e.getMessage());
                ui.failed(e.getMessage(), e);
            }
        } catch (Throwable t) { // native Errors included: a worker thread must never take the app down
            if (Failures.isFatal(t)) closePlugin(); // do not touch that runtime again
            String message = "Failed: " + Failures.describe(t);
            status(message);
            ui.failed(message, t);
        } finally {
            c.detach();
            boolean closeNow;
            synchronized (this) {
                active = false;
                closeNow = released;
            }
            if (closeNow) closePlugin();
            ui.ended();
        }
    }

    private Plugin pluginFor(String path) throws Exception {
        File f = new File(path);
        String key = f.getAbsolutePath() + "|" + f.length() + "|" + f.lastModified();
        synchronized (this) {
            if (plugin != null && key.equals(pluginKey)) return plugin;
        }
        closePlugin();
        Plugin loaded = loader.load(path);
        synchronized (this) {
            plugin = loaded;
            pluginKey = key;
        }
        return loaded;
    }

    private void closePlugin() {
        Plugin p;
        synchronized (this) {
            p = plugin;
            plugin = null;
            pluginKey = null;
        }
        if (p == null) return;
        try {
            p.close();
        } catch (Throwable ignored) {
            // a runtime that failed may fail to free too: nothing more to do
        }
    }

    private void status(String message) {
        synchronized (this) {
            lastStatus = message;
        }
        ui.status(message);
    }

    /** Stop that reaches a session in every phase, including before its connection exists. */
    static final class SessionControl {
        private boolean cancelled;
        private Connection current;

        synchronized void cancel() {
            cancelled = true;
            if (current != null) current.cancel();
        }

        synchronized boolean isCancelled() {
            return cancelled;
        }

        /** Registers the connection; false, with the connection cancelled, if Stop came first. */
        synchronized boolean attach(Connection connection) {
            if (cancelled) {
                connection.cancel();
                return false;
            }
            current = connection;
            return true;
        }

        synchronized void detach() {
            current = null;
        }
    }
}
