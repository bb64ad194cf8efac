package org.spa.protocol;

import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;
import java.util.concurrent.TimeUnit;

import okhttp3.OkHttpClient;
import okhttp3.Request;
import okhttp3.Response;
import okhttp3.WebSocket;
import okhttp3.WebSocketListener;
import okio.ByteString;

/**
 * The device loop over a websocket (OkHttp): the Java twin of
 * device_runtime/client.py. For a sigma = 0 position nothing goes up but a
 * batched `accept`; only sigma = 1 positions ask for taps and send `s`.
 *
 * Binary frames only; the client refuses a connection on which the gateway
 * negotiated a websocket extension (the protocol forbids permessage-deflate).
 * {@link #run} blocks the calling thread; OkHttp's reader thread only queues
 * frames, so the state machine is touched by one thread.
 *
 * Statistics use the Python client's names and definitions: bytes are
 * websocket payload bytes (after zstd) split into handshake (hello/ready) and
 * generation (everything after), "per token" divides generation bytes by the
 * committed tokens; a round trip is a message whose answer the device needs
 * before it can commit its next token (need_taps, side, and an accept the
 * gateway needed to draft further).
 */
public final class GatewayClient {
    /** Called on the thread running {@link #run}, once per committed token. */
    public interface Listener {
        /** @param text the characters this commit completed (may be empty: a partial UTF-8 character) */
        void onCommit(Commit commit, String text);
    }

    private static final Object OPEN = new Object(), CANCEL = new Object();

    private final String url;
    private final PluginExecutor executor;
    private final Messages.Plugin plugin;
    private final double tau;
    private final String token;
    private int timeoutSeconds = 120;
    private int openTimeoutSeconds = 30;
    private List<String> offer = Frames.offer(); // frame compressions this device can load, preferred first
    private final BlockingQueue<Object> inbox = new LinkedBlockingQueue<Object>();

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

    /** Ask a running {@link #run} to send `bye` and stop (from any thread). */
    public void cancel() {
        inbox.add(CANCEL);
    }

    /** Generate one summary; blocks until `end` (or a failure). */
    public SessionResult run(String prompt, Messages.Options options, Listener listener) throws ClientException {
        options.gateMargin = executor.gateReadsMargin(); // the plugin's gate decides whether steps carry margins
        DeviceSession session = new DeviceSession(new Messages.Hello(token, plugin, prompt, options, null, null, null, offer));
        gateP.clear();
        // both forms are read until ready names the choice; the hello goes in the preferred one
        Frames frames = new Frames(Limits.MAX_FRAME_BYTES, Limits.MAX_MESSAGE_BYTES, 3, null, offer.get(0));
        String compression = null;
        Counters counters = new Counters();
        SessionResult result = new SessionResult();
        Utf8Stream utf8 = new Utf8Stream();
        OkHttpClient http = new OkHttpClient.Builder()
                .connectTimeout(openTimeoutSeconds, TimeUnit.SECONDS)
                .readTimeout(timeoutSeconds, TimeUnit.SECONDS)
                .build();
        long tStart = System.nanoTime();
        long tFirst = -1, tLast = -1;
        WebSocket ws;
        try {
            ws = http.newWebSocket(new Request.Builder().url(url).build(), new Inbox());
        } catch (IllegalArgumentException e) {
            shutdown(http, frames);
            throw new ClientException("bad gateway URL " + url + ": " + e.getMessage());
        }
        try {
            while (!session.ended()) {
                Object ev = inbox.poll(timeoutSeconds, TimeUnit.SECONDS);
                if (ev == null) throw new ClientException("no message from the gateway for " + timeoutSeconds + " s");
                if (ev == CANCEL) {
                    send(ws, frames, new Messages.Bye(), counters);
                    ws.close(ErrorCodes.NORMAL_CLOSE, "bye");
                    throw new ClientException("cancelled");
                }
                if (ev == OPEN) {
                    byte[] hello = frames.pack(session.helloMessage());
                    counters.handshakeUp += hello.length;
                    ws.send(ByteString.of(hello));
                    continue;
                }
                if (ev instanceof Closed) throw new ClientException(((Closed) ev).describe(url, session.ready() != null));
                if (ev instanceof String) throw new ProtocolException("bad_frame", "text message; the protocol uses binary messages only");
                byte[] data = (byte[]) ev;
                if (session.ready() == null) counters.handshakeDown += data.length;
                else counters.down += data.length;
                Map<String, Object> msg = frames.unpack(data);
                if ("ready".equals(msg.get("type"))) { // the connection's frame compression from here on
                    Object choice = msg.get("compression");
                    compression = choice == null ? Frames.ZSTD : String.valueOf(choice);
                    if (!offer.contains(compression)) {
                        throw new ProtocolException("bad_field", "ready.compression: \"" + compression + "\" was not offered " + offer);
                    }
                    frames.negotiated(compression);
                }
                counters.count(counters.messagesDown, String.valueOf(msg.get("type")));
                session.receive(msg); // a verdict commits a token
                compute(session); // a sigma = 0 gate commits a draft
                List<Commit> commits = session.committed;
                for (int i = result.tokens.size(); i < commits.size(); i++) {
                    Commit c = commits.get(i);
                    tLast = System.nanoTime();
                    if (tFirst < 0) tFirst = tLast;
                    result.tokens.add(c.token);
                    result.sigmas.add(c.sigma ? 1 : 0);
                    Float p = gateP.remove(c.pos);
                    result.gateP.add(p == null ? null : (Double) (double) p);
                    if (listener != null) listener.onCommit(c, utf8.append(c.piece));
                }
                if (inbox.isEmpty()) flush(ws, frames, session, counters);
            }
            ws.close(ErrorCodes.NORMAL_CLOSE, null);
        } catch (PeerException e) {
            ws.cancel();
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
        } catch (ClientException e) {
            ws.cancel();
            throw e;
        } catch (RuntimeException | Error e) { // the plugin executor failed (a native Error too), or a bug: drop the connection
            ws.cancel();
            throw e;
        } finally {
            shutdown(http, frames);
        }
        // The whole byte string decoded at once, as the Python client does; the streamed
        // pieces (for display) hold back split characters and may differ only on invalid UTF-8.
        result.text = session.text();
        result.finishReason = session.end().reason;
        fillStats(result, session, counters, options, tStart, tFirst, tLast);
        result.stats.put("compression", compression);
        return result;
    }

    /** p of each gated, not yet committed position (a voided draft was never gated). */
    private final Map<Long, Float> gateP = new java.util.HashMap<Long, Float>();

    /** Answer every action the protocol has for us: gates, then a side output. */
    private void compute(DeviceSession session) {
        DeviceAction action;
        while ((action = session.nextAction()) != null) {
            if (action instanceof DeviceAction.RunGate) {
                float p = executor.gate(((DeviceAction.RunGate) action).row());
                gateP.put(action.pos, p);
                session.gated(action.pos, (double) p > tau); // float32 p against the double tau, as Python does
            } else {
                session.sideOutput(action.pos, executor.side(((DeviceAction.RunSide) action).taps));
            }
        }
    }

    private static void flush(WebSocket ws, Frames frames, DeviceSession session, Counters counters) {
        long knownVerified = session.gatewayVerified();
        for (Messages.Message msg : session.flush()) {
            if (msg instanceof Messages.NeedTaps || msg instanceof Messages.Side) {
                counters.roundTrips++;
            } else if (msg instanceof Messages.Accept && ((Messages.Accept) msg).upto + 1 > knownVerified + session.window) {
                counters.roundTrips++;
            }
            send(ws, frames, msg, counters);
            counters.count(counters.messagesUp, msg.type());
        }
    }

    private static void send(WebSocket ws, Frames frames, Messages.Message msg, Counters counters) {
        byte[] data = frames.pack(msg.toMap());
        counters.up += data.length;
        ws.send(ByteString.of(data));
    }

    private void fillStats(SessionResult r, DeviceSession session, Counters c, Messages.Options options,
                           long tStart, long tFirst, long tLast) {
        int n = Math.max(r.tokens.size(), 1);
        int sideTokens = 0;
        for (int s : r.sigmas) sideTokens += s;
        Map<String, Object> s = r.stats;
        s.put("tokens", r.tokens.size());
        s.put("side_tokens", sideTokens);
        s.put("side_usage", sideTokens / (double) n);
        s.put("rollbacks", session.rollbacks);
        s.put("change_rate", session.rollbacks / (double) Math.max(sideTokens, 1));
        s.put("dropped_drafts", session.dropped);
        s.put("bytes_down", c.down);
        s.put("bytes_up", c.up);
        s.put("bytes_down_per_token", c.down / (double) n);
        s.put("bytes_up_per_token", c.up / (double) n);
        s.put("handshake_bytes_up", c.handshakeUp);
        s.put("handshake_bytes_down", c.handshakeDown);
        s.put("messages_down", c.messagesDown);
        s.put("messages_up", c.messagesUp);
        s.put("round_trips", c.roundTrips);
        s.put("round_trips_per_token", c.roundTrips / (double) n);
        s.put("ttft_s", tFirst < 0 ? null : (Object) ((tFirst - tStart) / 1e9));
        s.put("tokens_per_s", tFirst >= 0 && tLast > tFirst ? (Object) ((r.tokens.size() - 1) / ((tLast - tFirst) / 1e9)) : null);
        s.put("wall_s", (System.nanoTime() - tStart) / 1e9);
        s.put("window", options.window);
        s.put("codec", options.codec);
        s.put("tau", tau);
        s.put("gateway", session.end().stats);
        s.put("client", "java");
    }

    private static void shutdown(OkHttpClient http, Frames frames) {
        http.dispatcher().executorService().shutdown(); // lets a CLI's JVM exit at once
        http.connectionPool().evictAll();
        frames.close();
    }

    private static final class Counters {
        long up, down, handshakeUp, handshakeDown;
        int roundTrips;
        final Map<String, Object> messagesDown = new TreeMap<String, Object>(); // message type -> count
        final Map<String, Object> messagesUp = new TreeMap<String, Object>(); // (flushed messages; not hello)

        void count(Map<String, Object> table, String type) {
            Object n = table.get(type);
            table.put(type, n == null ? 1 : (Integer) n + 1);
        }
    }

    /** The connection went away: closed by the gateway, or failed. */
    private static final class Closed {
        final int code;
        final String reason;
        final Throwable failure;

        Closed(int code, String reason, Throwable failure) {
            this.code = code;
            this.reason = reason;
            this.failure = failure;
        }

        String describe(String url, boolean connected) {
            if (failure != null && !connected) {
                return "cannot reach the gateway at " + url + ": " + failure;
            }
            if (failure != null) return "the connection to the gateway failed: " + failure;
            return "the gateway closed the connection before the summary ended (code " + code
                    + (reason == null || reason.isEmpty() ? "" : ", " + reason) + ")";
        }
    }

    /** OkHttp's callbacks (its reader thread): queue everything for the session thread. */
    private final class Inbox extends WebSocketListener {
        @Override
        public void onOpen(WebSocket webSocket, Response response) {
            String ext = response.header("Sec-WebSocket-Extensions");
            if (ext != null && !ext.trim().isEmpty()) {
                inbox.add(new Closed(0, null, new IllegalStateException(
                        "the gateway negotiated websocket extensions (" + ext + "); the protocol forbids websocket compression")));
                webSocket.close(1002, "extensions are not allowed");
                return;
            }
            inbox.add(OPEN);
        }

        @Override
        public void onMessage(WebSocket webSocket, ByteString bytes) {
            inbox.add(bytes.toByteArray());
        }

        @Override
        public void onMessage(WebSocket webSocket, String text) {
            inbox.add(text);
        }

        @Override
        public void onClosing(WebSocket webSocket, int code, String reason) {
            // Echo the gateway's code; codes that may not be sent (1005: none given) become 1000.
            boolean sendable = code >= 1000 && code < 5000 && code != 1004 && code != 1005 && code != 1006
                    && !(code >= 1015 && code < 3000);
            webSocket.close(sendable ? code : ErrorCodes.NORMAL_CLOSE, null);
            inbox.add(new Closed(code, reason, null));
        }

        @Override
        public void onClosed(WebSocket webSocket, int code, String reason) {
            inbox.add(new Closed(code, reason, null));
        }

        @Override
        public void onFailure(WebSocket webSocket, Throwable t, Response response) {
            inbox.add(new Closed(0, null, t));
        }
    }
}
