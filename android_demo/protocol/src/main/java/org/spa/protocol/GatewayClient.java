package org.spa.protocol;

import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

import okhttp3.OkHttpClient;
import okhttp3.Request;
import okhttp3.WebSocket;
import okio.ByteString;

/**
 * The device loop over a websocket (OkHttp): the Java twin of device_runtime/client.py. For
 * a sigma = 0 position nothing goes up but a batched `accept`; only sigma = 1 positions ask
 * for taps (unless the gateway pushed them) and send `s`.
 *
 * Options, as `spa summarize`'s: several side outputs in flight ({@link #inFlight}), pushed
 * taps ({@link #pushTaps}), the cloud-side projection ({@link #cloudProjection}), frame
 * compression ({@link #compression}), and resumption after a lost connection
 * ({@link #reconnect}, on by default): the client reconnects with backoff (50 ms to 1 s) for
 * up to the gateway's `resume_grace_s` and resumes with the latest signed token, the committed
 * tokens and the first hello's uploads (docs/PROTOCOL.md section 6); nothing committed is lost
 * or repeated. Device-side settlement ({@link #settle}, version 3): with the backbone's output
 * head on the device, greedy side tokens are proven here and only their ids go up; a gateway that
 * does not offer it (or a sampled session) gets the gateway's verdicts, as before.
 *
 * Binary frames only; the client refuses a connection on which the gateway negotiated a
 * websocket extension (the protocol forbids permessage-deflate). {@link #run} blocks the
 * calling thread; OkHttp's reader thread only queues events, so the state machine is touched
 * by one thread. Statistics: {@link ClientStats}.
 */
public final class GatewayClient {
    /** Called on the thread running {@link #run}, once per committed token. */
    public interface Listener {
        /** @param text the characters this commit completed (may be empty: a partial UTF-8 character) */
        void onCommit(Commit commit, String text);
    }

    static final int PING_SECONDS = 20;

    private final String url;
    private final PluginExecutor executor;
    private final Messages.Plugin plugin;
    private final double tau;
    private final String token;
    private int timeoutSeconds = 120;
    private int openTimeoutSeconds = 30;
    private List<String> offer = Frames.offer(); // frame compressions this device can load, preferred first
    private int maxInFlight = 1;
    private boolean pushTaps = false, cloudProjection = false, reconnect = true;
    private OutputHead head = null; // settlement: the backbone's output head, null for none
    private volatile boolean cancelled = false;
    private volatile ConnectionEvents current; // the connection cancel() must reach

    /**
     * @param plugin the plugin part of `hello` (fingerprint, taps, content hash)
     * @param tau gate threshold: sigma = p > tau
     * @param token auth token, "" for none
     */
    public GatewayClient(String url, PluginExecutor executor, Messages.Plugin plugin, double tau, String token) {
        this.url = url;
        this.executor = executor;
        this.plugin = plugin;
        this.tau = tau;
        this.token = token == null ? "" : token;
    }

    /** Seconds without any message from the gateway before giving up (default 120). */
    public GatewayClient timeout(int seconds) {
        timeoutSeconds = seconds;
        return this;
    }

    /**
     * The frame compressions to offer in `hello`, preferred first (default {@link Frames#offer()}:
     * zstd and none if zstd-jni loads, else none only). docs/PROTOCOL.md section 2.
     */
    public GatewayClient compression(List<String> offer) {
        if (offer == null || offer.isEmpty()) throw new IllegalArgumentException("offer at least one compression");
        this.offer = offer;
        return this;
    }

    /** How many side outputs may await their verdict at once (default 1; `spa summarize --in-flight`). */
    public GatewayClient inFlight(int n) {
        if (n < 1) throw new IllegalArgumentException("in flight must be >= 1, got " + n);
        maxInFlight = n;
        return this;
    }

    /** Upload the gate (hello.gate) so that the gateway sends taps with the steps it predicts open. */
    public GatewayClient pushTaps(boolean on) {
        pushTaps = on;
        return this;
    }

    /** Upload the per-tap projections (hello.projection): r values per tap come down instead of H. */
    public GatewayClient cloudProjection(boolean on) {
        cloudProjection = on;
        return this;
    }

    /**
     * Settle side tokens on the device (docs/PROTOCOL.md section 6, "Settlement") with the
     * backbone's output head ({@link OutputHead#load}; null: do not settle, the default). Only
     * greedy sessions settle; the side output of a settled token never leaves the device.
     */
    public GatewayClient settle(OutputHead head) {
        if (head != null && !head.fingerprint.equals(plugin.fingerprint)) {
            throw new IllegalArgumentException("the output head is backbone '" + head.fingerprint
                    + "'s, the plugin's is '" + plugin.fingerprint + "'");
        }
        this.head = head;
        return this;
    }

    /** Resume the session after a lost connection, within the gateway's grace (default on). */
    public GatewayClient reconnect(boolean on) {
        reconnect = on;
        return this;
    }

    /** Ask a running {@link #run} to send `bye` and stop (from any thread). */
    public void cancel() {
        cancelled = true;
        ConnectionEvents events = current;
        if (events != null) events.queue.add(ConnectionEvents.CANCEL);
    }

    /** Generate one summary; blocks until `end` (or a failure). */
    public SessionResult run(String prompt, Messages.Options options, Listener listener) throws ClientException {
        options.gateMargin = executor.gateReadsMargin(); // the plugin's gate decides whether steps carry margins
        options.settle = head != null && options.temperature == 0; // a sampled token cannot be proven
        Messages.Hello hello;
        Messages.Projection projection;
        try {
            projection = cloudProjection ? PluginUploads.projection(executor) : null;
            // named by hash: a gateway that kept the weights from an earlier session needs no upload
            hello = new Messages.Hello(token, plugin, prompt, options, null,
                    projection == null ? null : projection.byHash(),
                    pushTaps ? PluginUploads.gate(executor, tau) : null, offer);
        } catch (UnsupportedOperationException e) {
            throw new ClientException(e.getMessage());
        }
        Session s = new Session(new DeviceSession(hello, maxInFlight), listener);
        s.projection = projection;
        OkHttpClient http = new OkHttpClient.Builder()
                .connectTimeout(openTimeoutSeconds, TimeUnit.SECONDS)
                .readTimeout(timeoutSeconds, TimeUnit.SECONDS)
                // keepalive, as the Python client's (20 s): a link that died without a reset (a phone
                // changing networks) fails here, without a close frame, and the session is resumed
                .pingInterval(PING_SECONDS, TimeUnit.SECONDS)
                .build();
        try {
            keepResuming(http, s);
        } finally {
            http.dispatcher().executorService().shutdown(); // lets a CLI's JVM exit at once
            http.connectionPool().evictAll();
        }
        // The whole byte string decoded at once, as the Python client does; the streamed
        // pieces (for display) hold back split characters and may differ only on invalid UTF-8.
        s.result.text = s.session.text();
        s.result.finishReason = s.session.end().reason;
        s.stats.fill(s.result, s.session, options, tau, cloudProjection, pushTaps);
        return s.result;
    }

    /** Connections until the session ends: the first, then resumes while the grace lasts. */
    private void keepResuming(OkHttpClient http, Session s) throws ClientException {
        long lostSince = -1, backoffMs = 50;
        int resumesSeen = 0;
        while (!s.session.ended()) {
            String reason;
            try {
                connection(http, s);
                continue;
            } catch (UploadNeeded e) { // this gateway does not hold the projection: the next hello carries it
                s.session.upload(s.projection);
                s.stats.projectionUploads++;
                continue;
            } catch (Lost e) {
                reason = e.getMessage();
            }
            double grace = graceSeconds(s.session);
            if (!reconnect || grace <= 0 || s.session.sessionId() == null) {
                throw new ClientException("lost the connection to the gateway mid-generation (" + reason + ")");
            }
            if (s.session.resumes > resumesSeen) { // the last resume worked: this is a new outage
                lostSince = -1;
                backoffMs = 50;
                resumesSeen = s.session.resumes;
            }
            long now = System.nanoTime();
            if (lostSince < 0) lostSince = now;
            if ((now - lostSince) / 1e9 > grace) {
                throw new ClientException("lost the connection to the gateway mid-generation and could not resume within "
                        + grace + " s (" + reason + ")");
            }
            try {
                Thread.sleep(backoffMs);
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                throw new ClientException("interrupted");
            }
            if (cancelled) throw new ClientException("cancelled");
            backoffMs = Math.min(backoffMs * 2, 1000);
        }
    }

    private static double graceSeconds(DeviceSession session) {
        if (session.ready() == null) return 0;
        Object g = session.ready().limits.get("resume_grace_s");
        return g instanceof Number ? ((Number) g).doubleValue() : 0;
    }

    /**
     * One websocket connection: hello (or the resume hello), then messages until the end.
     * Throws {@link Lost} when it ends early in a way a resume may repair.
     */
    private void connection(OkHttpClient http, Session s) throws ClientException, Lost, UploadNeeded {
        DeviceSession session = s.session;
        ConnectionEvents events = new ConnectionEvents();
        current = events;
        if (cancelled) events.queue.add(ConnectionEvents.CANCEL);
        // both forms are read until ready/resumed names the choice; the hello goes in the preferred one
        Frames frames = new Frames(Limits.MAX_FRAME_BYTES, Limits.MAX_MESSAGE_BYTES, 3, null, offer.get(0));
        WebSocket ws;
        try {
            ws = http.newWebSocket(new Request.Builder().url(url).build(), events);
        } catch (IllegalArgumentException e) {
            frames.close();
            throw new ClientException("bad gateway URL " + url + ": " + e.getMessage());
        }
        try {
            while (!session.ended()) {
                Object ev = events.queue.poll(timeoutSeconds, TimeUnit.SECONDS);
                if (ev == null) throw new ClientException("no message from the gateway for " + timeoutSeconds + " s");
                if (ev == ConnectionEvents.CANCEL) {
                    send(ws, frames, new Messages.Bye(), s.stats);
                    ws.close(ErrorCodes.NORMAL_CLOSE, "bye");
                    throw new ClientException("cancelled");
                }
                if (ev == ConnectionEvents.OPEN) {
                    byte[] hello = frames.pack(session.ready() != null ? session.resumeHello() : session.helloMessage());
                    s.stats.handshakeUp += hello.length;
                    ws.send(ByteString.of(hello));
                    continue;
                }
                if (ev instanceof ConnectionEvents.Closed) {
                    ConnectionEvents.Closed c = (ConnectionEvents.Closed) ev;
                    if (session.ready() != null && c.resumable()) {
                        throw new Lost(session.resuming() && c.failure != null ? "cannot reconnect: " + c.failure : c.brief());
                    }
                    throw new ClientException(c.describe(url, session.ready() != null));
                }
                if (ev instanceof String) throw new ProtocolException("bad_frame", "text message; the protocol uses binary messages only");
                receive(session, frames, (byte[]) ev, s);
                if (events.queue.isEmpty()) flush(ws, frames, session, s.stats);
            }
            ws.close(ErrorCodes.NORMAL_CLOSE, null);
        } catch (PeerException e) {
            ws.cancel();
            if ("upload_needed".equals(e.code) && s.projection != null && s.session.hello.projection.weight == null) {
                throw new UploadNeeded();
            }
            if ("resume_failed".equals(e.code)) {
                throw new ClientException("the gateway no longer has this session (it restarted, or the session expired): "
                        + "resume_failed: " + e.detail);
            }
            throw new ClientException("the gateway refused the session: " + e.code + ": " + e.detail);
        } catch (ProtocolException e) {
            try { // tell the gateway why, then close with the code's close code
                ws.send(ByteString.of(frames.pack(Messages.Error.of(e).toMap())));
                ws.close(e.closeCode(), e.code);
            } catch (RuntimeException ignored) {
                ws.cancel();
            }
            throw new ClientException("the gateway broke the protocol: " + e.getMessage());
        } catch (InterruptedException e) {
            ws.cancel();
            Thread.currentThread().interrupt();
            throw new ClientException("interrupted");
        } catch (ClientException | Lost e) {
            ws.cancel(); // no close frame: a close frame would abandon the session (docs/PROTOCOL.md section 2)
            throw e;
        } catch (RuntimeException | Error e) { // the plugin executor failed (a native Error too), or a bug: drop the connection
            ws.cancel();
            throw e;
        } finally {
            frames.close();
        }
    }

    /** One received frame: the protocol, then the plugin's work, then the commits it made. */
    private void receive(DeviceSession session, Frames frames, byte[] data, Session s)
            throws ProtocolException, PeerException {
        boolean handshake = session.ready() == null || session.resuming();
        if (handshake) s.stats.handshakeDown += data.length;
        else s.stats.down += data.length;
        Map<String, Object> msg = frames.unpack(data);
        Object type = msg.get("type");
        if ("ready".equals(type) || "resumed".equals(type)) { // the connection's frame compression from here on
            Object choice = msg.get("compression");
            String form = choice == null ? Frames.ZSTD : String.valueOf(choice);
            if (!offer.contains(form)) {
                throw new ProtocolException("bad_field", type + ".compression: \"" + form + "\" was not offered " + offer);
            }
            frames.negotiated(form);
            s.stats.compression = form;
        }
        ClientStats.count(s.stats.messagesDown, String.valueOf(type));
        session.receive(msg); // a verdict (or a resumed's commit) commits a token
        compute(session, s.gateP); // a sigma = 0 gate commits a draft
        List<Commit> commits = session.committed;
        for (int i = s.result.tokens.size(); i < commits.size(); i++) {
            Commit c = commits.get(i);
            s.stats.committed();
            s.result.tokens.add(c.token);
            s.result.sigmas.add(c.sigma ? 1 : 0);
            s.result.changed.add(session.changedPositions.contains(c.pos) ? 1 : 0);
            Float p = s.gateP.remove(c.pos);
            s.result.gateP.add(p == null ? null : (Double) (double) p);
            if (s.listener != null) s.listener.onCommit(c, s.utf8.append(c.piece));
        }
    }

    /** Answer every action the protocol has for us: proofs, side outputs whose taps are here, gates. */
    private void compute(DeviceSession session, Map<Long, Float> gateP) {
        DeviceAction action;
        while ((action = session.nextAction()) != null) {
            if (action instanceof DeviceAction.RunGate) {
                float p = executor.gate(((DeviceAction.RunGate) action).row());
                gateP.put(action.pos, p);
                session.gated(action.pos, (double) p > tau); // float32 p against the double tau, as Python does
            } else if (action instanceof DeviceAction.RunHead) {
                DeviceAction.RunHead proof = (DeviceAction.RunHead) action;
                Integer token = head.certify(proof.f, proof.s).token;
                session.certified(proof.pos, token == null ? null : (Long) (long) token,
                        token == null ? new byte[0] : head.piece(token));
            } else {
                DeviceAction.RunSide side = (DeviceAction.RunSide) action;
                session.sideOutput(side.pos, side.projected ? executor.sideProjected(side.taps) : executor.side(side.taps));
            }
        }
    }

    private static void flush(WebSocket ws, Frames frames, DeviceSession session, ClientStats stats) {
        long knownVerified = session.gatewayVerified();
        for (Messages.Message msg : session.flush()) {
            byte[] data = frames.pack(msg.toMap());
            stats.sent(msg, data.length, knownVerified, session.window);
            ws.send(ByteString.of(data));
        }
    }

    private static void send(WebSocket ws, Frames frames, Messages.Message msg, ClientStats stats) {
        byte[] data = frames.pack(msg.toMap());
        stats.up += data.length;
        ws.send(ByteString.of(data));
    }

    /** One run's state across its connections. */
    private static final class Session {
        final DeviceSession session;
        final Listener listener;
        final SessionResult result = new SessionResult();
        final ClientStats stats = new ClientStats();
        final Utf8Stream utf8 = new Utf8Stream();
        // p of each gated, not yet committed position (a voided draft was never gated)
        final Map<Long, Float> gateP = new HashMap<Long, Float>();
        Messages.Projection projection; // the projection's weights, sent only to a gateway that asks

        Session(DeviceSession session, Listener listener) {
            this.session = session;
            this.listener = listener;
        }
    }

    /** The gateway does not hold the projection this hello named by hash (`upload_needed`). */
    private static final class UploadNeeded extends Exception {
        private static final long serialVersionUID = 1L;
    }

    /** The connection ended before the session did, in a way a resume may repair. */
    private static final class Lost extends Exception {
        private static final long serialVersionUID = 1L;

        Lost(String why) {
            super(why);
        }
    }
}
