package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.junit.Test;

/**
 * The device state machine against scripted gateways: the ordering rules of
 * tests/protocol/test_state_machines.py and the two sequence diagrams of docs/PROTOCOL.md
 * section 6 (lock-step, and draft-ahead with a rollback).
 */
public class DeviceSessionTest {
    static final int H = MessagesTest.H;
    static final Activation F = MessagesTest.F, T = MessagesTest.T;

    static DeviceSession generating(int window, long promptTokens) throws Exception {
        Messages.Options o = new Messages.Options();
        o.window = window;
        o.maxNewTokens = 30;
        DeviceSession dp = new DeviceSession(new Messages.Hello("tok",
                new Messages.Plugin(MessagesTest.BACKBONE.fingerprint, MessagesTest.TAPS, "h"), "prompt", o));
        dp.receive(new Messages.Ready("s", "r", MessagesTest.BACKBONE, promptTokens, new LinkedHashMap<String, Object>()).toMap());
        return dp;
    }

    @Test
    public void aMarginGateReadsEachStepsMarginAndRefusesStepsWithout() throws Exception {
        Messages.Options o = new Messages.Options();
        o.window = 2;
        o.gateMargin = true;
        DeviceSession dp = new DeviceSession(new Messages.Hello("tok",
                new Messages.Plugin(MessagesTest.BACKBONE.fingerprint, MessagesTest.TAPS, "h"), "prompt", o));
        assertEquals(Boolean.TRUE, ((Map<?, ?>) dp.helloMessage().get("options")).get("gate_margin"));
        dp.receive(new Messages.Ready("s", "r", MessagesTest.BACKBONE, 5, new LinkedHashMap<String, Object>()).toMap());
        dp.receive(new Messages.Step(0, 4, F, 9, new byte[] {'a'}, 2.5f).toMap());
        DeviceAction.RunGate gate = (DeviceAction.RunGate) dp.nextAction();
        float[] row = gate.row();
        assertEquals(H + 1, row.length);
        assertEquals(2.5f, row[H], 0f);
        assertArrayEquals(F.values[0], java.util.Arrays.copyOf(row, H), 0f);
        dp.gated(4, false);
        assertEquals("bad_field", codeOf(dp, step(0, 5, 10, "b"))); // no margin: the gateway predates them
    }

    @Test
    public void aPlainGateReadsFAloneEvenWhenAStepCarriesAMargin() throws Exception {
        DeviceSession dp = generating(0, 5);
        dp.receive(new Messages.Step(0, 4, F, 9, new byte[] {'a'}, 2.5f).toMap());
        assertEquals(H, ((DeviceAction.RunGate) dp.nextAction()).row().length);
    }

    static Map<String, Object> step(long epoch, long pos, long draft, String piece) {
        return new Messages.Step(epoch, pos, F, draft, piece.getBytes(StandardCharsets.UTF_8)).toMap();
    }

    static Map<String, Object> end(long tokens) {
        Map<String, Object> stats = new LinkedHashMap<String, Object>();
        stats.put("tokens", tokens);
        return new Messages.End("eos", stats).toMap();
    }

    static String codeOf(DeviceSession dp, Map<String, Object> msg) {
        try {
            dp.receive(msg);
        } catch (ProtocolException e) {
            return e.code;
        } catch (PeerException e) {
            return "peer:" + e.code;
        }
        fail("accepted " + msg.get("type"));
        return null;
    }

    static List<String> sent(List<Messages.Message> out) {
        List<String> s = new ArrayList<String>();
        for (Messages.Message m : out) {
            if (m instanceof Messages.Accept) s.add("accept(" + ((Messages.Accept) m).epoch + "," + ((Messages.Accept) m).upto + ")");
            else if (m instanceof Messages.NeedTaps) s.add("need_taps(" + ((Messages.NeedTaps) m).epoch + "," + ((Messages.NeedTaps) m).pos + ")");
            else if (m instanceof Messages.Side) s.add("side(" + ((Messages.Side) m).epoch + "," + ((Messages.Side) m).pos + ")");
            else s.add(m.type());
        }
        return s;
    }

    static List<Long> tokens(DeviceSession dp) {
        List<Long> t = new ArrayList<Long>();
        for (Commit c : dp.committed) t.add(c.token);
        return t;
    }

    static List<String> list(String... s) {
        List<String> l = new ArrayList<String>();
        for (String x : s) l.add(x);
        return l;
    }

    @Test
    public void orderingRules() throws Exception {
        DeviceSession dp = generating(1, 5); // first position 4
        assertEquals("out_of_order", codeOf(dp, step(0, 5, 3, "a"))); // gap
        assertEquals("out_of_order", codeOf(dp, step(1, 4, 3, "a"))); // wrong epoch
        dp.receive(step(0, 4, 3, "a"));
        dp.receive(step(0, 5, 3, "a"));
        assertEquals("out_of_order", codeOf(dp, step(0, 6, 3, "a"))); // beyond W + 1
        DeviceAction a = dp.nextAction();
        assertTrue(a instanceof DeviceAction.RunGate);
        assertEquals(4, a.pos);
        dp.gated(4, true);
        assertNull(dp.nextAction());
        assertEquals(list("need_taps(0,4)"), sent(dp.flush()));
        assertEquals("out_of_order", codeOf(dp, new Messages.Verdict(0, 4, 3, new byte[] {'a'}, false).toMap())); // no side yet
        assertEquals("bad_field", codeOf(dp, new Messages.Taps(0, 4, F).toMap())); // 1 row, 3 taps
        dp.receive(new Messages.Taps(0, 4, T).toMap());
        DeviceAction side = dp.nextAction();
        assertTrue(side instanceof DeviceAction.RunSide);
        assertEquals(3, ((DeviceAction.RunSide) side).taps.length);
        assertEquals(H, ((DeviceAction.RunSide) side).taps[0].length);
        dp.sideOutput(4, TestData.randomStates(9, 1, H)[0]);
        assertEquals(list("side(0,4)"), sent(dp.flush()));
        assertEquals("out_of_order", codeOf(dp, new Messages.Verdict(0, 4, 9, new byte[] {'b'}, false).toMap())); // changed lies
        assertEquals("out_of_order", codeOf(dp, new Messages.Verdict(0, 4, 9, new byte[] {'b'}, true).toMap())); // epoch not bumped
        dp.receive(new Messages.Verdict(1, 4, 9, new byte[] {'b'}, true).toMap());
        assertEquals(1, dp.rollbacks);
        assertEquals(1, dp.dropped); // step 5 was void
        assertEquals(1, dp.epoch());
        assertEquals("out_of_order", codeOf(dp, step(0, 5, 3, "a"))); // old epoch after the verdict
        dp.receive(step(1, 5, 0, "a"));
        dp.gated(5, false);
        assertEquals(list("accept(1,5)"), sent(dp.flush()));
        assertEquals("out_of_order", codeOf(dp, end(3))); // 2 committed
        dp.receive(end(2));
        assertTrue(dp.ended());
        assertEquals(java.util.Arrays.asList(9L, 0L), tokens(dp));
        assertEquals("ba", dp.text());
        assertEquals("peer:internal", codeOf(generating(2, 5), new Messages.Error("internal", "boom").toMap()));
    }

    @Test
    public void refusesAnotherBackbone() throws Exception {
        DeviceSession dp = new DeviceSession(new Messages.Hello("", new Messages.Plugin("fp-123", MessagesTest.TAPS, "h"),
                "p", new Messages.Options()));
        Messages.Backbone other = new Messages.Backbone("x", "other-fp", 4, H);
        assertEquals("backbone_mismatch", codeOf(dp, new Messages.Ready("s", "r", other, 5, new LinkedHashMap<String, Object>()).toMap()));
    }

    @Test
    public void refusesMessagesItDoesNotReceive() throws Exception {
        DeviceSession dp = generating(0, 5);
        assertEquals("unknown_type", codeOf(dp, new Messages.Accept(0, 4).toMap()));
        assertEquals("out_of_order", codeOf(dp, new Messages.Ready("s", "r", MessagesTest.BACKBONE, 5, new LinkedHashMap<String, Object>()).toMap()));
        DeviceSession fresh = new DeviceSession(dp.hello);
        assertEquals("out_of_order", codeOf(fresh, step(0, 4, 3, "a"))); // before ready
    }

    /** docs/PROTOCOL.md section 6, "Lock-step (W = 0), prompt of 5 tokens". */
    @Test
    public void lockStepWithAChangedVerdict() throws Exception {
        DeviceSession dp = generating(0, 5);
        dp.receive(step(0, 4, 10, "a"));
        dp.gated(4, false); // commit a
        assertEquals(list("accept(0,4)"), sent(dp.flush()));
        dp.receive(step(0, 5, 11, "b"));
        dp.gated(5, true);
        assertEquals(list("need_taps(0,5)"), sent(dp.flush()));
        dp.receive(new Messages.Taps(0, 5, T).toMap());
        DeviceAction.RunSide side = (DeviceAction.RunSide) dp.nextAction();
        dp.sideOutput(side.pos, new float[H]);
        assertEquals(list("side(0,5)"), sent(dp.flush()));
        dp.receive(new Messages.Verdict(1, 5, 12, "B".getBytes(StandardCharsets.UTF_8), true).toMap());
        dp.receive(step(1, 6, 0, "c"));
        dp.gated(6, false);
        assertEquals(list("accept(1,6)"), sent(dp.flush()));
        dp.receive(end(3));
        assertEquals(java.util.Arrays.asList(10L, 12L, 0L), tokens(dp));
        assertEquals("aBc", dp.text());
        boolean[] sigma = new boolean[3];
        for (int i = 0; i < 3; i++) sigma[i] = dp.committed.get(i).sigma;
        assertArrayEquals(new boolean[] {false, true, false}, sigma);
        assertEquals(1, dp.sidePositions);
    }

    /** docs/PROTOCOL.md section 6, "Draft ahead (W = 2) with a rollback". */
    @Test
    public void draftAheadWithARollback() throws Exception {
        DeviceSession dp = generating(2, 5);
        dp.receive(step(0, 4, 1, "a"));
        dp.receive(step(0, 5, 2, "b"));
        dp.receive(step(0, 6, 3, "c"));
        assertEquals("out_of_order", codeOf(dp, step(0, 7, 4, "d"))); // 3 = W + 1 unverified: the gateway must wait
        dp.gated(dp.nextAction().pos, false); // 4: commit a
        assertEquals(5, dp.nextAction().pos);
        dp.gated(5, true);
        assertNull(dp.nextAction()); // steps 6 is buffered, not gated
        assertEquals(list("need_taps(0,5)"), sent(dp.flush())); // need_taps accepts 4: no separate accept
        dp.receive(step(0, 7, 4, "d")); // 7 <= v + W = 5 + 2: allowed now
        assertEquals("out_of_order", codeOf(dp, step(0, 8, 4, "e")));
        dp.receive(new Messages.Taps(0, 5, T).toMap());
        DeviceAction.RunSide side = (DeviceAction.RunSide) dp.nextAction();
        dp.sideOutput(side.pos, new float[H]);
        assertNull(dp.nextAction());
        assertEquals(list("side(0,5)"), sent(dp.flush()));
        dp.receive(new Messages.Verdict(1, 5, 20, "B".getBytes(StandardCharsets.UTF_8), true).toMap());
        assertEquals(2, dp.dropped); // drafts 6 and 7 are void
        dp.receive(step(1, 6, 5, "x"));
        dp.receive(step(1, 7, 6, "y"));
        dp.receive(step(1, 8, 7, "z"));
        DeviceAction a;
        while ((a = dp.nextAction()) != null) dp.gated(a.pos, false);
        assertEquals(list("accept(1,8)"), sent(dp.flush())); // one accept for three positions
        dp.receive(end(5));
        assertEquals("aBxyz", dp.text());
        assertEquals(1, dp.rollbacks);
        assertEquals(1, dp.sidePositions);
    }

    @Test
    public void unchangedVerdictKeepsBufferedDrafts() throws Exception {
        DeviceSession dp = generating(2, 5);
        dp.receive(step(0, 4, 1, "a"));
        dp.receive(step(0, 5, 2, "b"));
        dp.gated(4, true);
        dp.flush();
        dp.receive(new Messages.Taps(0, 4, T).toMap());
        dp.sideOutput(4, new float[H]);
        dp.flush();
        dp.receive(new Messages.Verdict(0, 4, 1, new byte[] {'a'}, false).toMap());
        assertEquals(0, dp.epoch());
        assertEquals(5, dp.nextAction().pos); // step 5 stays valid
        dp.gated(5, false);
        assertEquals(list("accept(0,5)"), sent(dp.flush()));
        dp.receive(end(2));
        assertEquals(0, dp.dropped);
    }

    @Test(expected = IllegalStateException.class)
    public void callerMisuseIsABugNotAProtocolError() throws Exception {
        DeviceSession dp = generating(0, 5);
        dp.receive(step(0, 4, 1, "a"));
        dp.gated(5, false);
    }
}
