package org.spa.protocol;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.junit.Test;

/** Message round trips and field validation (mirrors tests/protocol/test_state_machines.py). */
public class MessagesTest {
    static final int H = 16;
    static final int[] TAPS = {0, 2, 4};
    static final Messages.Backbone BACKBONE = new Messages.Backbone("fake-lm", "fp-123", 4, H);
    static final Activation F = Activation.of(TestData.randomStates(7, 1, H), "int8", 8);
    static final Activation T = Activation.of(TestData.randomStates(8, TAPS.length, H), "int8", 8);

    static Map<String, Object> limits() {
        Map<String, Object> l = new LinkedHashMap<String, Object>();
        l.put("max_frame_bytes", (long) Limits.MAX_FRAME_BYTES);
        l.put("idle_timeout_s", 120.0);
        return l;
    }

    static List<Messages.Message> examples() {
        Messages.Options o = new Messages.Options();
        o.window = 2;
        o.codec = "int4";
        o.outliers = 4;
        o.maxNewTokens = 50;
        o.temperature = 0.7;
        o.seed = 1L << 40;
        Map<String, Object> stats = new LinkedHashMap<String, Object>();
        stats.put("tokens", 3L);
        stats.put("rollbacks", 1L);
        stats.put("seconds", 0.5);
        List<Messages.Message> m = new ArrayList<Messages.Message>();
        m.add(new Messages.Hello("secret", new Messages.Plugin("fp-123", TAPS, "sha256:abc"), "Summarize: \u00e9 ...", o));
        m.add(new Messages.Hello("", new Messages.Plugin("fp", new int[] {1}, "h"), "p", new Messages.Options(),
                new Messages.Resume("s1", "r1", 11L, new long[] {5, 7}), new Messages.Projection(2, new byte[] {1, 2}, new byte[] {3}),
                new Messages.GateUpload(new byte[] {4}, new byte[] {5}, 0.25), null));
        m.add(new Messages.Ready("s1", "r1", BACKBONE, 12, limits()));
        m.add(new Messages.Step(0, 11, F, 42, new byte[] {(byte) 0xc3}));
        m.add(new Messages.Accept(0, 11));
        m.add(new Messages.NeedTaps(1, 12));
        m.add(new Messages.Taps(1, 12, T));
        m.add(new Messages.Side(1, 12, F));
        m.add(new Messages.Verdict(2, 12, 7, new byte[] {(byte) 0xa9, ' '}, true));
        m.add(new Messages.End("eos", stats));
        m.add(new Messages.Error("limit", "too many"));
        m.add(new Messages.Bye());
        Messages.Options margins = new Messages.Options();
        margins.gateMargin = true;
        m.add(new Messages.Hello("", new Messages.Plugin("fp", new int[] {1}, "h"), "p", margins));
        m.add(new Messages.Step(0, 12, F, 43, new byte[] {'a'}, 0.375f));
        return m;
    }

    @Test
    public void everyMessageRoundTripsThroughFrames() throws Exception {
        Frames f = new Frames();
        for (Messages.Message msg : examples()) {
            Map<String, Object> d = msg.toMap();
            Messages.Message back = Messages.parse(f.unpack(f.pack(d)));
            assertEquals(msg.type(), back.type());
            assertTrue(msg.type(), TestData.deepEquals(d, back.toMap()));
        }
    }

    static void assertBad(Map<String, Object> d, String code, String where) {
        try {
            Messages.parse(d);
            fail("accepted " + d);
        } catch (ProtocolException e) {
            assertEquals(String.valueOf(d), code, e.code);
            assertTrue(e.detail + " should start with " + where, e.detail.startsWith(where));
        }
    }

    static Map<String, Object> map(Object... kv) {
        return TestData.with(new LinkedHashMap<String, Object>(), kv);
    }

    @Test
    @SuppressWarnings("unchecked")
    public void rejectsBadFields() {
        List<Messages.Message> ex = examples();
        Map<String, Object> hello = ex.get(0).toMap(), step = ex.get(3).toMap(), verdict = ex.get(8).toMap();
        Map<String, Object> options = (Map<String, Object>) hello.get("options"), plugin = (Map<String, Object>) hello.get("plugin");
        Map<String, Object> fBadQ = TestData.with((Map<String, Object>) F.encoded, "q", new byte[0]);
        Map<String, Object> tokens1 = map("tokens", 1L), rollbacks = map("rollbacks", 1L), nan = map("tokens", Double.NaN);
        assertBad(map("epoch", 0L, "upto", 1L), "bad_field", "message.type");
        assertBad(map("type", 5L), "bad_field", "message.type");
        assertBad(map("type", "teleport"), "unknown_type", "");
        assertBad(map("type", "accept", "epoch", 0L), "bad_field", "accept.upto");
        assertBad(map("type", "accept", "epoch", true, "upto", 1L), "bad_field", "accept.epoch");
        assertBad(map("type", "accept", "epoch", -1L, "upto", 1L), "bad_field", "accept.epoch");
        assertBad(map("type", "accept", "epoch", 0L, "upto", 1L << 31), "bad_field", "accept.upto");
        assertBad(map("type", "accept", "epoch", 0L, "upto", 1.0), "bad_field", "accept.upto");
        assertBad(TestData.with(step, "piece", "text"), "bad_field", "step.piece");
        assertBad(TestData.with(step, "f", fBadQ), "bad_field", "step.f");
        assertBad(TestData.with(step, "margin", -0.5), "bad_field", "step.margin");
        assertBad(TestData.with(step, "margin", Double.NaN), "bad_field", "step.margin");
        assertBad(TestData.with(step, "margin", 1e39), "bad_field", "step.margin");
        assertBad(TestData.with(step, "margin", "1"), "bad_field", "step.margin");
        assertBad(TestData.with(hello, "options", TestData.with(options, "gate_margin", 1L)), "bad_field", "hello.options.gate_margin");
        assertBad(TestData.with(verdict, "changed", 1L), "bad_field", "verdict.changed");
        assertBad(map("type", "end", "reason", "tired", "stats", tokens1), "bad_field", "end.reason");
        assertBad(map("type", "end", "reason", "eos", "stats", rollbacks), "bad_field", "end.stats.tokens");
        assertBad(map("type", "end", "reason", "eos", "stats", nan), "bad_field", "end.stats");
        assertBad(TestData.with(hello, "version", (long) Messages.VERSION + 1, "plugin", null), "version", "");
        assertBad(TestData.with(hello, "options", TestData.with(options, "codec", "int2")), "bad_field", "hello.options.codec");
        assertBad(TestData.with(hello, "options", TestData.with(options, "temperature", -1L)), "bad_field", "hello.options.temperature");
        assertBad(TestData.with(hello, "plugin", TestData.with(plugin, "taps", TestData.list(2L, 1L))), "bad_field", "hello.plugin.taps");
        assertBad(TestData.with(hello, "resume", map("session", "s")), "bad_field", "hello.resume.secret");
        assertBad(map("type", "error", "code", "x", "message", new String(new char[4097]).replace('\0', 'a')), "bad_field", "error.message");
        assertBad(map("type", "ready", "session", "s", "secret", "r", "backbone", BACKBONE.toMap(), "prompt_tokens", 0L,
                "limits", limits()), "bad_field", "ready.prompt_tokens");
    }

    @Test
    public void ignoresUnknownKeys() throws Exception {
        Map<String, Object> d = TestData.with(new Messages.Accept(0, 3).toMap(), "future", TestData.list(1L, 2L));
        Messages.Accept a = (Messages.Accept) Messages.parse(d);
        assertEquals(3, a.upto);
    }

    @Test
    public void errorMessagesAreCutTo4096Characters() {
        String longText = new String(new char[5000]).replace('\0', 'x');
        assertEquals(4096, Messages.Error.of(new ProtocolException("internal", longText)).message.length());
    }
}
