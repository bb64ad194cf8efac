package org.spa.protocol;

import java.util.concurrent.BlockingQueue;
import java.util.concurrent.LinkedBlockingQueue;

import okhttp3.Response;
import okhttp3.WebSocket;
import okhttp3.WebSocketListener;
import okio.ByteString;

/**
 * One websocket connection's events, queued for the session thread: OkHttp calls the listener
 * on its reader thread, the session thread takes {@link #OPEN}, byte[] (a binary message),
 * String (a text message, which the protocol forbids), {@link Closed} or {@link #CANCEL}.
 * Each connection has its own queue, so a late event of a dropped connection never reaches
 * the connection that resumed the session.
 */
final class ConnectionEvents extends WebSocketListener {
    static final Object OPEN = new Object(), CANCEL = new Object();

    final BlockingQueue<Object> queue = new LinkedBlockingQueue<Object>();

    /** The connection went away: closed by the gateway (code, reason), or failed (no close frame). */
    static final class Closed {
        final int code;
        final String reason;
        final Throwable failure;

        Closed(int code, String reason, Throwable failure) {
            this.code = code;
            this.reason = reason;
            this.failure = failure;
        }

        /**
         * Whether a resume may repair it (docs/PROTOCOL.md section 6): no close frame (a reset, a
         * cut link), a keepalive timeout (1011) or the gateway going away (1001: a restarted
         * gateway or another replica may rebuild the session). device_runtime/client.py's list.
         */
        boolean resumable() {
            return failure != null || code == 1011 || code == 1001;
        }

        String describe(String url, boolean connected) {
            if (failure != null && !connected) return "cannot reach the gateway at " + url + ": " + failure;
            if (failure != null) return "the connection to the gateway failed: " + failure;
            return "the gateway closed the connection before the summary ended (code " + code
                    + (reason == null || reason.isEmpty() ? "" : ", " + reason) + ")";
        }

        String brief() {
            return failure != null ? "no close frame: " + failure : "close code " + code;
        }
    }

    @Override
    public void onOpen(WebSocket webSocket, Response response) {
        String ext = response.header("Sec-WebSocket-Extensions");
        if (ext != null && !ext.trim().isEmpty()) {
            queue.add(new Closed(0, null, new IllegalStateException(
                    "the gateway negotiated websocket extensions (" + ext + "); the protocol forbids websocket compression")));
            webSocket.close(1002, "extensions are not allowed");
            return;
        }
        queue.add(OPEN);
    }

    @Override
    public void onMessage(WebSocket webSocket, ByteString bytes) {
        queue.add(bytes.toByteArray());
    }

    @Override
    public void onMessage(WebSocket webSocket, String text) {
        queue.add(text);
    }

    @Override
    public void onClosing(WebSocket webSocket, int code, String reason) {
        // Echo the gateway's code; codes that may not be sent (1005: none given) become 1000.
        boolean sendable = code >= 1000 && code < 5000 && code != 1004 && code != 1005 && code != 1006
                && !(code >= 1015 && code < 3000);
        webSocket.close(sendable ? code : ErrorCodes.NORMAL_CLOSE, null);
        queue.add(new Closed(code, reason, null));
    }

    @Override
    public void onClosed(WebSocket webSocket, int code, String reason) {
        queue.add(new Closed(code, reason, null));
    }

    @Override
    public void onFailure(WebSocket webSocket, Throwable t, Response response) {
        queue.add(new Closed(0, null, t));
    }
}
