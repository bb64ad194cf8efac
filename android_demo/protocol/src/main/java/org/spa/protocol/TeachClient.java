package org.spa.protocol;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.concurrent.TimeUnit;

import okhttp3.OkHttpClient;
import okhttp3.Request;
import okhttp3.WebSocket;
import okio.ByteString;

/**
 * The states of a person's examples from the gateway, over one websocket (OkHttp): a `teach`
 * per example, the `states` answering it, then `bye` (docs/PROTOCOL.md section 6, "Teaching";
 * the Python twin is device_runtime/teach_client.py). Blocks the calling thread.
 */
public final class TeachClient {
    /** Told after each example's states arrived. */
    public interface Progress {
        void fetched(int done, int total);
    }

    private final String url;
    private final TeachSession session;
    private int timeoutSeconds = 120;
    public long bytesUp, bytesDown;

    public TeachClient(String url, TeachSession session) {
        this.url = url;
        this.session = session;
    }

    /** @param examples each {prompt, summary} */
    public List<TeachSession.ExampleStates> fetch(List<String[]> examples, Progress progress) throws ClientException {
        OkHttpClient http = new OkHttpClient.Builder().readTimeout(timeoutSeconds, TimeUnit.SECONDS).build();
        ConnectionEvents events = new ConnectionEvents();
        // the gateway answers a teach in the teach frame's form: zstd where zstd-jni loads, else none
        Frames frames = new Frames(Limits.MAX_FRAME_BYTES, Limits.MAX_MESSAGE_BYTES, 3, null, Frames.offer().get(0));
        List<TeachSession.ExampleStates> out = new ArrayList<TeachSession.ExampleStates>();
        WebSocket ws = null;
        try {
            ws = http.newWebSocket(new Request.Builder().url(url).build(), events);
            boolean open = false;
            while (out.size() < examples.size()) {
                Object ev = events.queue.poll(timeoutSeconds, TimeUnit.SECONDS);
                if (ev == null) throw new ClientException("no message from the gateway for " + timeoutSeconds + " s");
                if (ev instanceof ConnectionEvents.Closed) {
                    throw new ClientException(((ConnectionEvents.Closed) ev).describe(url, open));
                }
                if (ev == ConnectionEvents.OPEN) {
                    open = true;
                    send(ws, frames, examples.get(0));
                    continue;
                }
                if (!(ev instanceof byte[])) throw new ProtocolException("bad_frame", "text message");
                bytesDown += ((byte[]) ev).length;
                Map<String, Object> map = frames.unpack((byte[]) ev);
                Messages.Message msg = Messages.parse(map, Messages.DEVICE);
                if (msg instanceof Messages.Error) {
                    Messages.Error e = (Messages.Error) msg;
                    if ("unknown_type".equals(e.code)) {
                        throw new ClientException("the gateway does not serve teaching states (it predates on-device "
                                + "learning): " + e.message);
                    }
                    throw new ClientException("the gateway refused to teach: " + e.code + ": " + e.message);
                }
                if (!(msg instanceof TeachMessages.States)) throw new ProtocolException("out_of_order", "expected states");
                TeachSession.ExampleStates done = session.receive((TeachMessages.States) msg);
                if (done == null) continue;
                out.add(done);
                if (progress != null) progress.fetched(out.size(), examples.size());
                if (out.size() < examples.size()) send(ws, frames, examples.get(out.size()));
            }
            ws.send(ByteString.of(frames.pack(new Messages.Bye().toMap())));
            ws.close(ErrorCodes.NORMAL_CLOSE, "bye");
            return out;
        } catch (ProtocolException e) {
            throw new ClientException("the gateway broke the protocol: " + e.getMessage());
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new ClientException("interrupted");
        } finally {
            if (ws != null && out.size() < examples.size()) ws.cancel();
            frames.close();
            http.dispatcher().executorService().shutdown();
            http.connectionPool().evictAll();
        }
    }

    private void send(WebSocket ws, Frames frames, String[] example) {
        byte[] data = frames.pack(session.teach(example[0], example[1]).toMap());
        bytesUp += data.length;
        ws.send(ByteString.of(data));
    }
}
