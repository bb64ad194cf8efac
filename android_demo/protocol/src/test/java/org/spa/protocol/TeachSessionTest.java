package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.Map;

import org.junit.Test;

/** The teaching pair on the device: what a teach carries (no weights), and states joined and checked. */
public class TeachSessionTest {
    static final int H = 8, TAPS = 3;
    static final Messages.Plugin PLUGIN = new Messages.Plugin("fp", new int[] {0, 1, 2}, "hash");

    static TeachMessages.States states(long first, long total, int rows, int cols, boolean margins) {
        long[] targets = new long[rows];
        for (int i = 0; i < rows; i++) targets[i] = first + i;
        float[][] f = TestData.randomStates(first, rows, H), taps = TestData.randomStates(first + 7, rows * TAPS, cols);
        float[] m = margins ? new float[rows] : null;
        return new TeachMessages.States(first, total, 12, targets, Activation.of(f, "int8", 2), Activation.of(taps, "int8", 2), m);
    }

    /** Through the wire's encoding and the parser, as the device receives it. */
    static TeachMessages.States received(TeachMessages.States s) throws Exception {
        Frames frames = new Frames();
        return (TeachMessages.States) Messages.parse(frames.unpack(frames.pack(s.toMap())), Messages.DEVICE);
    }

    @Test
    public void aTeachCarriesTextAndThePluginsIdentityOnly() throws Exception {
        TeachSession session = new TeachSession(PLUGIN, "tok", "int8", 8, false, H, H, null);
        Map<String, Object> teach = session.teach("the prompt", "the summary").toMap();
        assertEquals(new java.util.HashSet<String>(java.util.Arrays.asList("type", "token", "plugin", "prompt", "summary",
                "codec", "outliers")), teach.keySet());
        for (Object v : teach.values()) assertTrue(v instanceof String || v instanceof Long || v instanceof Map);
        Messages.Message back = Messages.parse(new Frames().unpack(new Frames().pack(teach)), Messages.GATEWAY);
        assertEquals("the summary", ((TeachMessages.Teach) back).summary);
    }

    @Test
    public void statesInSeveralMessagesAreJoinedInOrder() throws Exception {
        TeachSession session = new TeachSession(PLUGIN, "", "int8", 2, false, H, H, null);
        session.teach("p", "s");
        TeachMessages.States a = received(states(0, 5, 3, H, false)), b = received(states(3, 5, 2, H, false));
        assertNull(session.receive(a));
        TeachSession.ExampleStates done = session.receive(b);
        assertEquals(5, done.rows());
        assertArrayEquals(new long[] {0, 1, 2, 3, 4}, done.targets);
        assertArrayEquals(a.taps.values[TAPS + 1], done.x[1][1], 0f); // row 1, tap 1
        assertArrayEquals(b.f.values[1], done.f[4], 0f);
    }

    @Test
    public void badStatesAreRefused() throws Exception {
        TeachSession session = new TeachSession(PLUGIN, "", "int8", 2, false, H, H, null);
        expect(session, states(1, 5, 2, H, false), "out_of_order"); // does not start at 0
        expect(session, states(0, 2, 3, H, false), "bad_field"); // more rows than the total
        expect(session, states(0, 5, 2, H + 1, false), "bad_field"); // taps of another width
        expect(session, states(0, 5, 2, H, true), "bad_field"); // margins nobody asked for
        TeachSession projected = new TeachSession(PLUGIN, "", "int8", 2, false, H, 4, null);
        assertEquals(1, projected.receive(received(states(0, 1, 1, 4, false))).rows()); // r = 4 columns
    }

    private static void expect(TeachSession session, TeachMessages.States s, String code) throws Exception {
        session.teach("p", "s");
        try {
            session.receive(received(s));
            fail("accepted " + code);
        } catch (ProtocolException e) {
            assertEquals(code, e.code);
        }
    }
}
