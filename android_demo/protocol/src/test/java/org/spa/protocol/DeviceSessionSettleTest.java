package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.junit.Test;

/**
 * Settlement (docs/PROTOCOL.md section 6, "Settlement") in the device state machine against
 * scripted gateways: the rules tests/protocol/test_settle.py checks for the Python device.
 */
public class DeviceSessionSettleTest {
    static final Activation F = MessagesTest.F, T = MessagesTest.T;

    /** A session that asked to settle, with `settle` in ready as the gateway's answer. */
    static DeviceSession session(int window, int inFlight, boolean gatewaySettles) throws Exception {
        Messages.Options o = new Messages.Options();
        o.window = window;
        o.maxNewTokens = 30;
        o.settle = true;
        DeviceSession dp = new DeviceSession(new Messages.Hello("tok",
                new Messages.Plugin(MessagesTest.BACKBONE.fingerprint, MessagesTest.TAPS, "h"), "prompt", o), inFlight);
        assertEquals(Boolean.TRUE, ((Map<?, ?>) dp.helloMessage().get("options")).get("settle"));
        dp.receive(new Messages.Ready("s", "r", MessagesTest.BACKBONE, 5, new LinkedHashMap<String, Object>(),
                Frames.ZSTD, gatewaySettles).toMap());
        return dp;
    }

    static Map<String, Object> step(long epoch, long pos, long draft, String piece, Messages.BranchRef branch) {
        return new Messages.Step(epoch, pos, F, draft, piece.getBytes(StandardCharsets.UTF_8), null, null, null, null,
                branch).toMap();
    }

    static Map<String, Object> taps(long epoch, long pos, Activation exact) {
        return new Messages.Taps(epoch, pos, T, exact).toMap();
    }

    /** Gate pos open, receive its taps with the exact f, compute its side output: a RunHead is next. */
    static DeviceAction.RunHead openUntilProof(DeviceSession dp, long pos) throws Exception {
        DeviceAction gate = dp.nextAction();
        assertEquals(pos, gate.pos);
        dp.gated(pos, true);
        assertEquals(DeviceSessionTest.list("need_taps(" + dp.epoch() + "," + pos + ")"), DeviceSessionTest.sent(dp.flush()));
        dp.receive(taps(dp.epoch(), pos, F));
        DeviceAction.RunSide side = (DeviceAction.RunSide) dp.nextAction();
        dp.sideOutput(pos, new float[MessagesTest.H]);
        DeviceAction.RunHead head = (DeviceAction.RunHead) dp.nextAction();
        assertEquals(pos, head.pos);
        assertArrayEquals(F.values[0], head.f, 0f); // the exact f the gateway sent, for the proof
        return head;
    }

    @Test
    public void aProvenTokenIsCommittedHereAndOnlyItsIdGoesUp() throws Exception {
        DeviceSession dp = session(2, 2, true);
        assertTrue(dp.settles());
        dp.receive(step(0, 4, 9, "a", null));
        openUntilProof(dp, 4);
        dp.certified(4, 9L, "a".getBytes(StandardCharsets.UTF_8)); // the draft, proven
        List<Messages.Message> out = dp.flush();
        assertEquals(1, out.size());
        assertTrue(out.get(0) instanceof Messages.Settled); // no `side`: s stays on the device
        assertEquals(9L, ((Messages.Settled) out.get(0)).token);
        assertEquals(java.util.Arrays.asList(9L), DeviceSessionTest.tokens(dp));
        assertEquals(1, dp.settled);
        assertEquals(0, dp.epoch());
    }

    @Test
    public void aProvenChangeAdoptsTheStreamedBranchLineWithoutARoundTrip() throws Exception {
        DeviceSession dp = session(2, 2, true);
        dp.receive(step(0, 4, 9, "a", null));
        dp.receive(step(0, 5, 7, "m", new Messages.BranchRef(4, 8))); // the line of token 8 at 4 ...
        dp.receive(step(0, 5, 6, "n", new Messages.BranchRef(4, 3))); // ... and of token 3
        openUntilProof(dp, 4);
        dp.certified(4, 3L, "c".getBytes(StandardCharsets.UTF_8)); // proven: 3, not the draft 9
        assertEquals(java.util.Arrays.asList(3L), DeviceSessionTest.tokens(dp));
        assertEquals(1, dp.epoch()); // the new epoch begins at once
        assertEquals(1, dp.rollbacks);
        assertEquals(1, dp.branchAdopted);
        DeviceAction next = dp.nextAction(); // the branch's draft is the main line's: gate it now
        assertTrue(next instanceof DeviceAction.RunGate);
        assertEquals(5, next.pos);
        dp.gated(5, false);
        dp.receive(step(0, 5, 10, "b", null)); // the old main line's draft, sent before the gateway knew: void
        assertEquals(java.util.Arrays.asList(3L, 6L), DeviceSessionTest.tokens(dp));
        // a late branch step of the adopted line continues the main line
        dp.receive(step(0, 6, 2, "z", new Messages.BranchRef(4, 3)));
        assertEquals(6, dp.nextAction().pos);
        assertEquals(DeviceSessionTest.list("settled", "accept(1,5)"), DeviceSessionTest.sent(dp.flush()));
    }

    @Test
    public void anUnprovenTokenSendsItsSideOutputAndTheVerdictDecides() throws Exception {
        DeviceSession dp = session(0, 1, true);
        dp.receive(step(0, 4, 9, "a", null));
        openUntilProof(dp, 4);
        dp.certified(4, null, new byte[0]);
        assertEquals(DeviceSessionTest.list("side(0,4)"), DeviceSessionTest.sent(dp.flush()));
        assertEquals(1, dp.unproven);
        dp.receive(new Messages.Verdict(1, 4, 5, new byte[] {'e'}, true, null).toMap());
        assertEquals(java.util.Arrays.asList(5L), DeviceSessionTest.tokens(dp));
        assertEquals(0, dp.settled);
    }

    @Test
    public void aGatewayThatDoesNotSettleGetsVerdictsAndRefusesNothingNew() throws Exception {
        DeviceSession dp = session(0, 1, false); // ready without settle: version 2 behaviour
        assertFalse(dp.settles());
        dp.receive(step(0, 4, 9, "a", null));
        dp.gated(4, true);
        dp.flush();
        dp.receive(taps(0, 4, null)); // no exact f: not needed
        dp.sideOutput(4, new float[MessagesTest.H]);
        assertEquals(DeviceSessionTest.list("side(0,4)"), DeviceSessionTest.sent(dp.flush()));
        assertEquals("out_of_order", DeviceSessionTest.codeOf(dp, step(0, 5, 1, "q", new Messages.BranchRef(4, 1))));
    }

    @Test
    public void aSettlingSessionRefusesTapsWithoutTheExactF() throws Exception {
        DeviceSession dp = session(0, 1, true);
        dp.receive(step(0, 4, 9, "a", null));
        dp.gated(4, true);
        dp.flush();
        assertEquals("out_of_order", DeviceSessionTest.codeOf(dp, taps(0, 4, null)));
    }

    @Test
    public void aResumeDropsTheBranchLines() throws Exception {
        DeviceSession dp = session(2, 2, true);
        dp.receive(step(0, 4, 9, "a", null));
        dp.receive(step(0, 5, 7, "m", new Messages.BranchRef(4, 3)));
        openUntilProof(dp, 4);
        dp.resumeHello();
        Map<String, Object> resumed = new LinkedHashMap<String, Object>();
        resumed.put("type", "resumed");
        resumed.put("session", "s");
        resumed.put("secret", "r2");
        resumed.put("epoch", 0L);
        resumed.put("pos", 4L);
        resumed.put("commits", new java.util.ArrayList<Object>());
        dp.receive(resumed);
        assertNull(dp.nextAction()); // the proof in hand is void: the gateway sends position 4 again
        dp.receive(step(0, 4, 9, "a", null));
        assertEquals(4, dp.nextAction().pos);
    }
}
