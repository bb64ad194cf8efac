package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.spa.protocol.DeviceSessionTest.codeOf;
import static org.spa.protocol.DeviceSessionTest.end;
import static org.spa.protocol.DeviceSessionTest.list;
import static org.spa.protocol.DeviceSessionTest.sent;
import static org.spa.protocol.DeviceSessionTest.step;
import static org.spa.protocol.DeviceSessionTest.tokens;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.junit.Test;

/**
 * The device state machine's options against scripted gateways, as spa/protocol/device.py
 * behaves (tests/protocol): several side outputs in flight (the diagram "Side outputs in
 * flight" of docs/PROTOCOL.md section 6), pushed taps, the cloud-side projection, resumption
 * after a lost connection, and refreshed resume tokens.
 */
public class DeviceSessionOptionsTest {
    static final int H = MessagesTest.H, RANK = 4;
    static final Activation T = MessagesTest.T;
    static final Activation PROJECTED = Activation.of(TestData.randomStates(11, MessagesTest.TAPS.length, RANK), "int8", 8);
    static final Messages.GateUpload GATE = new Messages.GateUpload(new byte[8 * H], new byte[8], 0.5);
    static final Messages.Projection PROJECTION = new Messages.Projection(RANK, new byte[2 * 3 * RANK * H], new byte[4 * 3 * RANK]);

    static DeviceSession session(int window, int inFlight, Messages.Projection projection, Messages.GateUpload gate)
            throws Exception {
        Messages.Options o = new Messages.Options();
        o.window = window;
        o.maxNewTokens = 30;
        Messages.Plugin plugin = new Messages.Plugin(MessagesTest.BACKBONE.fingerprint, MessagesTest.TAPS, "h");
        DeviceSession dp = new DeviceSession(new Messages.Hello("tok", plugin, "prompt", o, null, projection, gate,
                Arrays.asList("zstd", "none")), inFlight);
        Map<String, Object> limits = new LinkedHashMap<String, Object>();
        limits.put("resume_grace_s", 30L);
        dp.receive(new Messages.Ready("sess", "secret-0", MessagesTest.BACKBONE, 5, limits).toMap());
        return dp;
    }

    static Map<String, Object> verdict(long epoch, long pos, long token, String piece, boolean changed, String secret) {
        return new Messages.Verdict(epoch, pos, token, piece.getBytes(StandardCharsets.UTF_8), changed, secret).toMap();
    }

    static Map<String, Object> pushedStep(long pos, long draft, String piece) {
        return new Messages.Step(0, pos, MessagesTest.F, draft, piece.getBytes(StandardCharsets.UTF_8), null, T, null).toMap();
    }

    /** docs/PROTOCOL.md section 6, "Side outputs in flight (W = 3, --in-flight 2)". */
    @Test
    public void twoSideOutputsInFlightThenAChangedVerdictVoidsTheLaterDecision() throws Exception {
        DeviceSession dp = session(3, 2, null, null);
        dp.receive(step(0, 4, 1, "a"));
        dp.receive(step(0, 5, 2, "b"));
        dp.receive(step(0, 6, 3, "c"));
        dp.receive(step(0, 7, 4, "g"));
        dp.gated(4, true);
        dp.gated(5, false); // held: 4 is in flight
        dp.gated(6, true); // decides 5 as sigma = 0
        assertEquals(2, dp.inFlight());
        assertNull(dp.nextAction()); // 2 in flight: 7 waits
        assertEquals(list("need_taps(0,4)", "need_taps(0,6)"), sent(dp.flush()));
        assertTrue(dp.committed.isEmpty()); // nothing is shown before its verdict
        dp.receive(new Messages.Taps(0, 4, T).toMap());
        dp.receive(new Messages.Taps(0, 6, T).toMap());
        DeviceAction.RunSide first = (DeviceAction.RunSide) dp.nextAction();
        assertEquals(4, first.pos);
        assertFalse(first.projected);
        dp.sideOutput(4, new float[H]);
        dp.sideOutput(((DeviceAction.RunSide) dp.nextAction()).pos, new float[H]);
        assertNull(dp.nextAction()); // both side outputs await their verdicts
        assertEquals(list("side(0,4)", "side(0,6)"), sent(dp.flush()));
        dp.receive(verdict(0, 4, 1, "a", false, null));
        assertEquals(Arrays.asList(1L, 2L), tokens(dp)); // a, then b (sigma = 0 after it)
        dp.gated(dp.nextAction().pos, false); // 7: held behind 6
        assertEquals(list("accept(0,7)"), sent(dp.flush())); // conditional on the verdict of 6
        dp.receive(verdict(1, 6, 30, "C", true, null));
        assertEquals(Arrays.asList(1L, 2L, 30L), tokens(dp)); // 7 and its decision are dropped
        assertEquals(1, dp.dropped);
        assertNull(dp.nextAction());
        dp.receive(step(1, 7, 0, "h"));
        dp.gated(7, false);
        assertEquals(list("accept(1,7)"), sent(dp.flush()));
        dp.receive(end(4));
        assertEquals("abCh", dp.text());
        assertEquals(2, dp.maxInFlightSeen);
    }

    @Test
    public void aSecondSideOutputWaitsWhenOnlyOneMayBeInFlight() throws Exception {
        DeviceSession dp = session(3, 1, null, null);
        dp.receive(step(0, 4, 1, "a"));
        dp.receive(step(0, 5, 2, "b"));
        dp.gated(4, true);
        assertNull(dp.nextAction()); // gate 5 only after the verdict of 4
    }

    @Test
    public void pushedTapsSkipNeedTaps() throws Exception {
        DeviceSession dp = session(2, 1, null, GATE);
        dp.receive(pushedStep(4, 1, "a"));
        dp.receive(step(0, 5, 2, "b")); // no taps pushed: the gateway's gate said closed
        dp.gated(4, true);
        DeviceAction.RunSide side = (DeviceAction.RunSide) dp.nextAction();
        assertEquals(4, side.pos);
        dp.sideOutput(4, new float[H]);
        assertEquals(list("side(0,4)"), sent(dp.flush())); // no need_taps round trip
        assertEquals(1, dp.pushedUsed);
        dp.receive(verdict(0, 4, 1, "a", false, null));
        dp.gated(5, true); // our gate disagrees with the gateway's prediction: ask as usual
        assertEquals(list("need_taps(0,5)"), sent(dp.flush()));
        assertEquals(1, dp.pushedUsed);
    }

    @Test
    public void pushedTapsWithAClosedGateAreIgnored() throws Exception {
        DeviceSession dp = session(2, 1, null, GATE);
        dp.receive(pushedStep(4, 1, "a"));
        dp.gated(4, false);
        assertEquals(list("accept(0,4)"), sent(dp.flush()));
        assertEquals(0, dp.pushedUsed);
    }

    @Test
    public void pushedTapsWithoutAGateUploadAreRefused() throws Exception {
        assertEquals("out_of_order", codeOf(session(2, 1, null, null), pushedStep(4, 1, "a")));
    }

    @Test
    public void projectedTapsHaveRankColumns() throws Exception {
        DeviceSession dp = session(0, 1, PROJECTION, null);
        dp.receive(step(0, 4, 1, "a"));
        dp.gated(4, true);
        dp.flush();
        assertEquals("bad_field", codeOf(dp, new Messages.Taps(0, 4, T).toMap())); // H columns, not r
        dp.receive(new Messages.Taps(0, 4, PROJECTED).toMap());
        DeviceAction.RunSide side = (DeviceAction.RunSide) dp.nextAction();
        assertTrue(side.projected);
        assertEquals(RANK, side.taps[0].length);
        Map<String, Object> hello = dp.helloMessage();
        assertEquals((long) RANK, ((Map<?, ?>) hello.get("projection")).get("rank"));
    }

    @Test
    public void refreshedSecretsReplaceTheResumeToken() throws Exception {
        DeviceSession dp = session(1, 1, null, null);
        assertEquals("secret-0", dp.secret());
        dp.receive(new Messages.Step(0, 4, MessagesTest.F, 1, new byte[] {'a'}, null, null, "secret-1").toMap());
        assertEquals("secret-1", dp.secret());
        dp.gated(4, true);
        dp.flush();
        dp.receive(new Messages.Taps(0, 4, T).toMap());
        dp.sideOutput(4, new float[H]);
        dp.flush();
        dp.receive(verdict(0, 4, 1, "a", false, "secret-2"));
        assertEquals("secret-2", dp.secret());
        Map<?, ?> resume = (Map<?, ?>) dp.resumeHello().get("resume");
        assertEquals("secret-2", resume.get("secret"));
    }

    /** A verdict lost with the connection: the gateway sends it again in resumed.commits. */
    @Test
    public void resumeAfterALostVerdictCommitsWhatTheGatewayVerified() throws Exception {
        DeviceSession dp = session(2, 1, PROJECTION, GATE);
        dp.receive(step(0, 4, 1, "a"));
        dp.receive(step(0, 5, 2, "b"));
        dp.gated(4, false); // commit a
        dp.gated(5, true);
        assertEquals(list("need_taps(0,5)"), sent(dp.flush()));
        dp.receive(new Messages.Taps(0, 5, PROJECTED).toMap());
        dp.receive(step(0, 6, 3, "c"));
        dp.sideOutput(5, new float[H]);
        dp.flush();
        // the connection dies here; the verdict of 5 (changed) and the step after it are lost
        Map<String, Object> hello = dp.resumeHello();
        assertTrue(dp.resuming());
        Map<?, ?> resume = (Map<?, ?>) hello.get("resume");
        assertEquals("sess", resume.get("session"));
        assertEquals("secret-0", resume.get("secret"));
        assertEquals(5L, resume.get("next")); // the first position not committed
        assertArrayEquals(le32(1), (byte[]) resume.get("tokens"));
        assertTrue(hello.containsKey("projection") && hello.containsKey("gate")); // the first hello's uploads again
        assertEquals(Arrays.asList("zstd", "none"), hello.get("compression"));
        assertEquals("out_of_order", codeOf(dp, step(0, 6, 3, "c"))); // nothing before resumed
        List<Commit> commits = new ArrayList<Commit>();
        commits.add(new Commit(5, 20, "B".getBytes(StandardCharsets.UTF_8), true));
        Map<String, Object> wrong = new Messages.Resumed("sess", "secret-r", 1, 7, commits, "zstd").toMap();
        assertEquals("out_of_order", codeOf(dp, wrong)); // pos must be next + len(commits); nothing changed
        dp.receive(new Messages.Resumed("sess", "secret-r", 1, 6, commits, "zstd").toMap());
        assertFalse(dp.resuming());
        assertEquals("secret-r", dp.secret());
        assertEquals(1, dp.epoch());
        assertEquals(Arrays.asList(1L, 20L), tokens(dp));
        assertTrue(dp.committed.get(1).sigma);
        assertEquals(1, dp.resumes);
        dp.receive(step(1, 6, 7, "x")); // steps continue from resumed.pos in the new epoch
        dp.gated(6, false);
        assertEquals(list("accept(1,6)"), sent(dp.flush()));
        dp.receive(end(3));
        assertEquals("aBx", dp.text());
    }

    /** An accept lost with the connection: the gateway applies resume.next, and the steps come again. */
    @Test
    public void resumeDropsWhatWasNotCommittedAndGatesTheStepsAgain() throws Exception {
        DeviceSession dp = session(2, 2, null, null);
        dp.receive(step(0, 4, 1, "a"));
        dp.receive(step(0, 5, 2, "b"));
        dp.gated(4, false);
        dp.gated(5, true); // in flight, its taps never came
        dp.flush();
        dp.resumeHello();
        dp.receive(new Messages.Resumed("sess", "secret-r", 0, 5, new ArrayList<Commit>(), "zstd").toMap());
        assertEquals(0, dp.inFlight());
        assertNull(dp.nextAction());
        dp.receive(step(0, 5, 2, "b"));
        assertEquals(5, dp.nextAction().pos);
        dp.gated(5, false);
        assertEquals(list("accept(0,5)"), sent(dp.flush()));
        dp.receive(end(2));
        assertEquals("ab", dp.text());
    }

    @Test
    public void resumedWithoutAResumeHelloOrForAnotherSessionIsRefused() throws Exception {
        List<Commit> none = new ArrayList<Commit>();
        assertEquals("out_of_order", codeOf(session(0, 1, null, null), new Messages.Resumed("sess", "x", 0, 4, none, "zstd").toMap()));
        DeviceSession dp = session(0, 1, null, null);
        dp.resumeHello();
        assertEquals("out_of_order", codeOf(dp, new Messages.Resumed("other", "x", 0, 4, none, "zstd").toMap()));
    }

    @Test
    public void unknownOptionalFieldsOfANewerGatewayAreIgnored() throws Exception {
        DeviceSession dp = session(0, 1, null, null);
        Map<String, Object> s = step(0, 4, 1, "a");
        s.put("settlement", "a field this client does not know");
        dp.receive(s);
        assertEquals(4, dp.nextAction().pos);
    }

    private static byte[] le32(long... tokens) {
        ByteBuffer b = ByteBuffer.allocate(4 * tokens.length).order(ByteOrder.LITTLE_ENDIAN);
        for (long t : tokens) b.putInt((int) t);
        return b.array();
    }
}
