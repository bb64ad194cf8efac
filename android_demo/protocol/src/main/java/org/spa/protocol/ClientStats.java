package org.spa.protocol;

import java.util.Map;
import java.util.TreeMap;

/**
 * What the Java client counts over one session, with the Python client's names and definitions
 * (device_runtime/client.py): bytes are websocket payload bytes (after zstd) split into
 * handshake (hello/ready/resumed) and generation (everything after), "per token" divides
 * generation bytes by the committed tokens; a round trip is a message whose answer the device
 * needs before it can commit its next token (need_taps, side, and an accept the gateway needed
 * to draft further: docs/PROTOCOL.md section 10).
 */
final class ClientStats {
    long up, down, handshakeUp, handshakeDown;
    int roundTrips;
    int projectionUploads; // hellos sent again with the projection's weights (upload_needed)
    String compression; // the frame compression the gateway chose (ready/resumed), last connection
    final Map<String, Object> messagesDown = new TreeMap<String, Object>(); // message type -> count
    final Map<String, Object> messagesUp = new TreeMap<String, Object>(); // (flushed messages; not hello)
    private final long tStart = System.nanoTime();
    private long tFirst = -1, tLast = -1;

    static void count(Map<String, Object> table, String type) {
        Object n = table.get(type);
        table.put(type, n == null ? 1 : (Integer) n + 1);
    }

    /** A message about to go up; whether it is a round trip is decided before the flush moved `v`. */
    void sent(Messages.Message msg, int bytes, long knownVerified, int window) {
        if (msg instanceof Messages.NeedTaps || msg instanceof Messages.Side) {
            roundTrips++;
        } else if (msg instanceof Messages.Accept && ((Messages.Accept) msg).upto + 1 > knownVerified + window) {
            roundTrips++;
        }
        up += bytes;
        count(messagesUp, msg.type());
    }

    void committed() {
        tLast = System.nanoTime();
        if (tFirst < 0) tFirst = tLast;
    }

    void fill(SessionResult r, DeviceSession session, Messages.Options options, double tau, boolean cloudProjection,
              boolean pushTaps) {
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
        s.put("bytes_down", down);
        s.put("bytes_up", up);
        s.put("bytes_down_per_token", down / (double) n);
        s.put("bytes_up_per_token", up / (double) n);
        s.put("handshake_bytes_up", handshakeUp);
        s.put("handshake_bytes_down", handshakeDown);
        s.put("messages_down", messagesDown);
        s.put("messages_up", messagesUp);
        s.put("round_trips", roundTrips);
        s.put("projection_uploads", projectionUploads);
        s.put("round_trips_per_token", roundTrips / (double) n);
        s.put("ttft_s", tFirst < 0 ? null : (Object) ((tFirst - tStart) / 1e9));
        s.put("tokens_per_s", tFirst >= 0 && tLast > tFirst ? (Object) ((r.tokens.size() - 1) / ((tLast - tFirst) / 1e9)) : null);
        s.put("wall_s", (System.nanoTime() - tStart) / 1e9);
        s.put("window", options.window);
        s.put("codec", options.codec);
        s.put("cloud_projection", cloudProjection);
        s.put("push_taps", pushTaps);
        s.put("pushed_taps_used", session.pushedUsed);
        s.put("max_in_flight", session.maxInFlightSeen);
        s.put("settle", options.settle && session.settles());
        s.put("settled", session.settled);
        s.put("unproven", session.unproven);
        s.put("branch_adopted", session.branchAdopted);
        s.put("tau", tau);
        s.put("gateway", session.end().stats);
        s.put("resumes", session.resumes);
        s.put("compression", compression);
        s.put("client", "java");
    }
}
