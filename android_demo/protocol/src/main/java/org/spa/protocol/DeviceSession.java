package org.spa.protocol;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;

/**
 * The device's side of a session, sans I/O: verify drafts strictly in order.
 * A port of spa/protocol/device.py (DeviceProtocol); rules in docs/PROTOCOL.md section 6.
 *
 * <pre>
 *   session = new DeviceSession(hello);  send session.helloMessage()
 *   on each received map:  session.receive(map)
 *   then until it is null: action = session.nextAction()
 *       RunGate -> session.gated(pos, gate(action.row()) > tau)
 *       RunSide -> session.sideOutput(pos, side(taps))
 *   when no received message is waiting: send each of session.flush()
 *   session.ended() -> done; session.committed holds the tokens
 * </pre>
 *
 * A position is committed only once its sigma is known: sigma = 0 commits the
 * draft, sigma = 1 the verdict's token. Nothing shown is ever taken back.
 */
public final class DeviceSession {
    private enum Phase { HELLO, GENERATING, ENDED }

    private enum Wait { TAPS, SIDE, VERDICT }

    public final Messages.Hello hello;
    public final int window;
    private Phase phase = Phase.HELLO;
    private Messages.Ready ready;
    private long epoch = 0;
    private long nextPos = 0; // next position to gate
    // Received steps not yet committed (all of this epoch), by position.
    private final TreeMap<Long, Messages.Step> steps = new TreeMap<Long, Messages.Step>();
    private long lastStepPos = -1;
    private long gatewayVerified = 0; // what the gateway knows is verified, from what we sent
    private Wait wait = null;
    private long waitPos = -1;
    private float[][] taps = null; // of the position in wait
    private Long pendingAccept = null; // end of a sigma = 0 run not yet sent
    private List<Messages.Message> outbox = new ArrayList<Messages.Message>();
    public final List<Commit> committed = new ArrayList<Commit>();
    private Messages.End end = null;
    public int sidePositions = 0;
    public int rollbacks = 0; // verdicts with changed = true
    public int dropped = 0; // steps voided by those verdicts

    public DeviceSession(Messages.Hello hello) {
        this.hello = hello;
        this.window = hello.options.window;
    }

    public boolean ended() {
        return phase == Phase.ENDED;
    }

    public Messages.Ready ready() {
        return ready;
    }

    public Messages.End end() {
        return end;
    }

    public long epoch() {
        return epoch;
    }

    /** The first position the gateway cannot yet know to be verified. */
    public long gatewayVerified() {
        return gatewayVerified;
    }

    /** True while the device waits for taps or a verdict (a sigma = 1 position is open). */
    public boolean awaitingGateway() {
        return wait == Wait.TAPS || wait == Wait.VERDICT;
    }

    public Map<String, Object> helloMessage() {
        return hello.toMap();
    }

    /** The committed text; a trailing partial UTF-8 character shows as U+FFFD. */
    public String text() {
        ByteArrayOutputStream b = new ByteArrayOutputStream();
        for (Commit c : committed) b.write(c.piece, 0, c.piece.length);
        return new String(b.toByteArray(), StandardCharsets.UTF_8);
    }

    // ------------------------------------------------------------------ incoming

    public void receive(Map<String, Object> d) throws ProtocolException, PeerException {
        Messages.Message msg = Messages.parse(d, Messages.DEVICE); // a gateway-bound type: unknown_type
        if (msg instanceof Messages.Error) {
            Messages.Error e = (Messages.Error) msg;
            throw new PeerException(e.code, e.message);
        }
        if (msg instanceof Messages.Ready) {
            onReady((Messages.Ready) msg);
            return;
        }
        if (!(msg instanceof Messages.Step || msg instanceof Messages.Taps
                || msg instanceof Messages.Verdict || msg instanceof Messages.End)) {
            throw new ProtocolException("unknown_type", "the device does not receive '" + msg.type() + "'");
        }
        if (phase != Phase.GENERATING) throw new ProtocolException("out_of_order", msg.type() + " outside generation");
        if (msg instanceof Messages.Step) onStep((Messages.Step) msg);
        else if (msg instanceof Messages.Taps) onTaps((Messages.Taps) msg);
        else if (msg instanceof Messages.Verdict) onVerdict((Messages.Verdict) msg);
        else onEnd((Messages.End) msg);
    }

    private void onReady(Messages.Ready r) throws ProtocolException {
        if (phase != Phase.HELLO) throw new ProtocolException("out_of_order", "second ready");
        if (!r.backbone.fingerprint.equals(hello.plugin.fingerprint)) {
            throw new ProtocolException("backbone_mismatch", "gateway serves '" + r.backbone.fingerprint
                    + "', plugin needs '" + hello.plugin.fingerprint + "'");
        }
        ready = r;
        nextPos = gatewayVerified = r.promptTokens - 1;
        lastStepPos = nextPos - 1;
        phase = Phase.GENERATING;
    }

    private void onStep(Messages.Step step) throws ProtocolException {
        // Steps voided by a rollback all arrive before its verdict (one ordered
        // stream), so any step that arrives carries the current epoch.
        expect(step.epoch == epoch, "step of epoch " + step.epoch + ", expected " + epoch);
        expect(step.pos == lastStepPos + 1, "step " + step.pos + " after step " + lastStepPos);
        expect(step.pos <= gatewayVerified + window,
                "step " + step.pos + " beyond window " + window + " after position " + gatewayVerified);
        checkShape(step.f, "step.f", 1);
        if (hello.options.gateMargin && step.margin == null) {
            throw new ProtocolException("bad_field", "step " + step.pos + " has no margin, which the hello asked for "
                    + "(options.gate_margin); this gateway may predate gate margins");
        }
        steps.put(step.pos, step);
        lastStepPos = step.pos;
    }

    private void onTaps(Messages.Taps t) throws ProtocolException {
        expect(wait == Wait.TAPS && waitPos == t.pos, "taps for position " + t.pos + " not asked for");
        expect(t.epoch == epoch, "taps of epoch " + t.epoch + ", expected " + epoch);
        checkShape(t.taps, "taps.taps", hello.plugin.taps.length);
        taps = t.taps.values;
        wait = Wait.SIDE;
    }

    private void onVerdict(Messages.Verdict v) throws ProtocolException {
        expect(wait == Wait.VERDICT && waitPos == v.pos, "verdict for position " + v.pos + " not expected");
        long draft = steps.get(v.pos).draft;
        expect(v.changed == (v.token != draft), "verdict.changed disagrees with the draft");
        expect(v.epoch == epoch + (v.changed ? 1 : 0), "verdict epoch " + v.epoch + " after epoch " + epoch);
        steps.remove(v.pos);
        if (v.changed) { // drafts after pos were built on the old token
            rollbacks++;
            dropped += steps.size();
            steps.clear();
            lastStepPos = v.pos;
            epoch = v.epoch;
        }
        commit(v.pos, v.token, v.piece, true);
        gatewayVerified = v.pos + 1;
        wait = null;
    }

    private void onEnd(Messages.End e) throws ProtocolException {
        expect(wait == null && steps.isEmpty() && pendingAccept == null, "end while positions are unverified");
        expect(e.tokens() == committed.size(),
                "end reports " + e.tokens() + " tokens, " + committed.size() + " committed");
        end = e;
        phase = Phase.ENDED;
    }

    // ------------------------------------------------------------------ the caller's work

    /** What to compute next, or null until more messages arrive. */
    public DeviceAction nextAction() {
        if (phase != Phase.GENERATING) return null;
        if (wait != null) return wait == Wait.SIDE ? new DeviceAction.RunSide(waitPos, taps) : null;
        Messages.Step step = steps.get(nextPos);
        if (step == null) return null;
        return new DeviceAction.RunGate(nextPos, step.f.values[0], hello.options.gateMargin ? step.margin : null);
    }

    /** Report sigma for the position of the last RunGate. */
    public void gated(long pos, boolean sigma) {
        require(wait == null && pos == nextPos && steps.containsKey(pos), "gated(" + pos + ")");
        if (!sigma) {
            Messages.Step step = steps.remove(pos);
            commit(pos, step.draft, step.piece, false);
            pendingAccept = pos;
            return;
        }
        sidePositions++;
        pendingAccept = null; // need_taps implies it
        outbox.add(new Messages.NeedTaps(epoch, pos));
        gatewayVerified = pos;
        wait = Wait.TAPS;
        waitPos = pos;
    }

    /** Report s [hidden_size] for the position of the last RunSide. */
    public void sideOutput(long pos, float[] s) {
        require(wait == Wait.SIDE && waitPos == pos, "sideOutput(" + pos + ")");
        Messages.Options o = hello.options;
        outbox.add(new Messages.Side(epoch, pos, Activation.of(new float[][] {s}, o.codec, o.outliers)));
        taps = null;
        wait = Wait.VERDICT;
    }

    /**
     * Messages to send now, in order; a run of sigma = 0 positions becomes one
     * `accept`. Call it when no received message is waiting.
     */
    public List<Messages.Message> flush() {
        if (pendingAccept != null) {
            outbox.add(new Messages.Accept(epoch, pendingAccept));
            gatewayVerified = pendingAccept + 1;
            pendingAccept = null;
        }
        List<Messages.Message> out = outbox;
        outbox = new ArrayList<Messages.Message>();
        return out;
    }

    // ------------------------------------------------------------------ helpers

    private void commit(long pos, long token, byte[] piece, boolean sigma) {
        committed.add(new Commit(pos, token, piece, sigma));
        nextPos = pos + 1;
    }

    private void checkShape(Activation a, String what, int rows) throws ProtocolException {
        int h = ready.backbone.hiddenSize;
        if (a.rows() != rows || a.cols() != h) {
            throw new ProtocolException("bad_field", what + " has shape (" + a.rows() + ", " + a.cols()
                    + "), expected (" + rows + ", " + h + ")");
        }
    }

    private static void expect(boolean ok, String what) throws ProtocolException {
        if (!ok) throw new ProtocolException("out_of_order", what);
    }

    private static void require(boolean ok, String what) {
        if (!ok) throw new IllegalStateException("device protocol misuse: " + what); // a bug in the caller
    }
}
