package org.spa.protocol;

import java.io.ByteArrayOutputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Iterator;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.TreeMap;

/**
 * The device's side of a session, sans I/O: a port of spa/protocol/device.py
 * (DeviceProtocol); rules in docs/PROTOCOL.md section 6.
 *
 * <pre>
 *   session = new DeviceSession(hello, maxInFlight);  send session.helloMessage()
 *   on each received map:  session.receive(map)
 *   then until it is null: action = session.nextAction()
 *       RunGate -> session.gated(pos, gate(action.row()) > tau)
 *       RunSide -> session.sideOutput(pos, side(taps)), or sideProjected(taps) when action.projected
 *       RunHead -> session.certified(pos, token, piece): a settling session's proof
 *                  ({@link OutputHead#certify}), token null where it does not hold
 *   when no received message is waiting: send each of session.flush()
 *   session.ended() -> done; session.committed holds the tokens
 *   connection lost before the end: on a new connection send session.resumeHello();
 *       the gateway answers `resumed`, then steps (or `end`) follow as before
 * </pre>
 *
 * Positions are gated in order. A sigma = 1 position asks for its taps (or uses the taps
 * pushed with its step) and sends its side output; with maxInFlight > 1 the device goes on
 * gating the next drafts meanwhile, so up to that many side outputs are in flight, each
 * conditional on the drafts before it. A position is committed only once it and every earlier
 * position are settled (sigma = 0: the draft; sigma = 1: the verdict's token), so nothing shown
 * is ever taken back. A verdict that changes its token voids every later decision: the gateway
 * drops the device's messages about them by their old epoch, and the device drops its own state.
 *
 * <p>Settlement (version 3, options.settle, once ready.settle agrees): with a position's taps the
 * gateway sends the exact f_t; after the side output the device tries to prove its token
 * (RunHead). A proven token is committed here, in order, like a verdict's, and only the token goes
 * up (`settled`): the side output stays on the device. Where the proof does not hold, `side` goes
 * up and the verdict decides. A settled token that changes the draft voids every later decision at
 * once, and when the gateway streamed the branch line of that token (step.branch), its drafts
 * become the main line's: gating goes on without a round trip.
 */
public final class DeviceSession {
    private enum Phase { HELLO, GENERATING, RESUMING, ENDED }

    /**
     * Where a sigma = 1 position stands: waiting for its taps, for its side output, for its proof
     * (settling), for its verdict; or proven here and waiting for the earlier positions' commits.
     */
    private enum Wait { TAPS, SIDE, HEAD, VERDICT, SETTLED }

    /** A token proven on the device, with its bytes. */
    private static final class Proven {
        final long token;
        final byte[] piece;

        Proven(long token, byte[] piece) {
            this.token = token;
            this.piece = piece;
        }
    }

    public Messages.Hello hello; // its projection swaps to the weights on upload_needed ({@link #upload})
    public final int window;
    public final int maxInFlight;
    private Phase phase = Phase.HELLO;
    private Messages.Ready ready;
    private String sessionId; // from ready
    private String secret; // the latest resume token: ready, a refreshed step/verdict, then each resumed
    private long epoch = 0;
    private long nextPos = 0; // next position to commit
    private long nextGate = 0; // next position to gate
    // Received steps not yet committed (all of this epoch), by position.
    private TreeMap<Long, Messages.Step> steps = new TreeMap<Long, Messages.Step>();
    private final TreeMap<Long, float[][]> pushed = new TreeMap<Long, float[][]>(); // taps that came with steps
    private long lastStepPos = -1;
    private long sentUpto = 0; // every position < sentUpto has its decision sent (or queued)
    // sigma of gated, uncommitted positions; for sigma = 1 also where its side stands:
    private TreeMap<Long, Boolean> sigma = new TreeMap<Long, Boolean>();
    private TreeMap<Long, Wait> sideState = new TreeMap<Long, Wait>();
    private TreeMap<Long, float[][]> taps = new TreeMap<Long, float[][]>(); // of positions in state SIDE
    // Settlement: whether the session settles (the hello asked, ready agreed); the exact f of
    // positions whose taps came; the side output of positions in state HEAD (as the gateway decodes
    // it); the proven tokens of positions in state SETTLED; streamed branch lines by (branch point,
    // token); the branch point a change adopted (its late branch steps are main-line steps).
    private boolean settles = false;
    private TreeMap<Long, float[]> exact = new TreeMap<Long, float[]>();
    private TreeMap<Long, Activation> heads = new TreeMap<Long, Activation>();
    private TreeMap<Long, Proven> proven = new TreeMap<Long, Proven>();
    private Map<Messages.BranchRef, List<Messages.Step>> branches = new HashMap<Messages.BranchRef, List<Messages.Step>>();
    private Messages.BranchRef adopted = null;
    private Long pendingAccept = null; // end of a sigma = 0 run not yet sent
    private List<Messages.Message> outbox = new ArrayList<Messages.Message>();
    public final List<Commit> committed = new ArrayList<Commit>();
    /** Positions whose verdict changed the draft (rollbacks). */
    public final Set<Long> changedPositions = new HashSet<Long>();
    private Messages.End end = null;
    public int sidePositions = 0; // sigma = 1 positions
    public int rollbacks = 0; // verdicts with changed = true
    public int dropped = 0; // steps voided by those verdicts
    public int pushedUsed = 0; // sigma = 1 positions answered from pushed taps (no need_taps)
    public int resumes = 0;
    public int maxInFlightSeen = 0; // most side outputs awaiting their verdict at once
    public int settled = 0; // committed sigma = 1 positions whose token the device proved itself
    public int unproven = 0; // sigma = 1 positions of a settling session where the proof did not hold
    public int branchAdopted = 0; // streamed branch steps that became main-line steps after a change

    /** One side output in flight at a time (gate the next draft only after the verdict). */
    public DeviceSession(Messages.Hello hello) {
        this(hello, 1);
    }

    /** @param maxInFlight how many sigma = 1 positions may await their verdict at once (at least 1) */
    public DeviceSession(Messages.Hello hello, int maxInFlight) {
        if (maxInFlight < 1) throw new IllegalArgumentException("maxInFlight must be >= 1, got " + maxInFlight);
        this.hello = hello;
        this.window = hello.options.window;
        this.maxInFlight = maxInFlight;
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

    /** Whether this session settles its side tokens (the hello asked and ready agreed). */
    public boolean settles() {
        return settles;
    }

    /** The session id from `ready` (null before it). */
    public String sessionId() {
        return sessionId;
    }

    /** The resume token the device holds now (docs/PROTOCOL.md section 6, "Resume tokens"). */
    public String secret() {
        return secret;
    }

    /** Between {@link #resumeHello} and the gateway's `resumed`. */
    public boolean resuming() {
        return phase == Phase.RESUMING;
    }

    /** sigma = 1 positions awaiting their verdict (or their taps). */
    public int inFlight() {
        return sideState.size();
    }

    /**
     * The most the gateway can have verified from what we sent: every decided position, up to
     * the first side output still awaiting its verdict.
     */
    public long gatewayVerified() {
        return sideState.isEmpty() ? sentUpto : Math.min(sentUpto, sideState.firstKey());
    }

    public Map<String, Object> helloMessage() {
        return hello.toMap();
    }

    /** The gateway answered `upload_needed`: the next hello (or resume hello) carries the projection's weights. */
    public void upload(Messages.Projection projection) {
        require((phase == Phase.HELLO || phase == Phase.RESUMING) && hello.projection != null
                && projection.digest().equals(hello.projection.digest()), "upload()");
        hello = new Messages.Hello(hello.token, hello.plugin, hello.prompt, hello.options, hello.resume, projection,
                hello.gate, hello.compression);
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
        if (msg instanceof Messages.Resumed) {
            onResumed((Messages.Resumed) msg);
            return;
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
        settles = hello.options.settle && r.settle;
        sessionId = r.session;
        secret = r.secret;
        nextPos = nextGate = sentUpto = r.promptTokens - 1;
        lastStepPos = nextPos - 1;
        phase = Phase.GENERATING;
    }

    /**
     * The `hello` that resumes this session on a new connection. Everything not committed is
     * dropped: the gateway sends the steps again from the first position it has not verified,
     * and the device gates them again. It carries everything a gateway that does not hold the
     * session needs to rebuild it: the committed token ids and the first hello's uploads.
     */
    public Map<String, Object> resumeHello() {
        require((phase == Phase.GENERATING || phase == Phase.RESUMING) && sessionId != null, "resumeHello()");
        phase = Phase.RESUMING;
        long[] tokens = new long[committed.size()];
        for (int i = 0; i < tokens.length; i++) tokens[i] = committed.get(i).token;
        return hello.resuming(new Messages.Resume(sessionId, secret, nextPos, tokens)).toMap();
    }

    private void onResumed(Messages.Resumed r) throws ProtocolException {
        expect(phase == Phase.RESUMING, "resumed without a resume hello");
        expect(r.session.equals(sessionId), "resumed names session '" + r.session + "', not '" + sessionId + "'");
        // The verified positions we missed (a lost verdict, and what the gateway verified after it).
        boolean inOrder = r.pos == nextPos + r.commits.size();
        for (int i = 0; i < r.commits.size() && inOrder; i++) inOrder = r.commits.get(i).pos == nextPos + i;
        expect(inOrder, "resumed commits " + r.commits.size() + " positions then position " + r.pos
                + "; the device is at " + nextPos);
        for (Commit c : r.commits) commit(c.pos, c.token, c.piece, c.sigma); // sigma as the gateway knew it
        branches.clear(); // the gateway dropped its branch lines
        adopted = null;
        secret = r.secret;
        epoch = r.epoch;
        forgetAfter(r.pos - 1);
        pendingAccept = null;
        lastStepPos = r.pos - 1;
        nextGate = sentUpto = r.pos;
        outbox = new ArrayList<Messages.Message>();
        resumes++;
        phase = Phase.GENERATING;
    }

    private void onStep(Messages.Step step) throws ProtocolException {
        if (step.branch != null && !step.branch.equals(adopted)) {
            onBranchStep(step);
            return;
        }
        if (step.branch != null) { // the line a change adopted: streamed before the gateway learned of it
            step = step.onMainLine(epoch);
            branchAdopted++;
        }
        if (settles && (step.epoch < epoch || step.pos > voidAfter())) {
            // A settling device changes tokens itself: the drafts the gateway made before it learned
            // of the change arrive after it (in the old epoch, or past a change not committed yet)
            // and are void.
            dropped++;
            return;
        }
        // Without settlement, steps voided by a rollback all arrive before its verdict (one
        // ordered stream), so any step that arrives carries the current epoch.
        expect(step.epoch == epoch, "step of epoch " + step.epoch + ", expected " + epoch);
        expect(step.pos == lastStepPos + 1, "step " + step.pos + " after step " + lastStepPos);
        expect(step.pos <= gatewayVerified() + window,
                "step " + step.pos + " beyond window " + window + " after position " + gatewayVerified());
        if (step.secret != null) secret = step.secret; // a refreshed resume token
        if (hello.options.gateMargin && step.margin == null) {
            throw new ProtocolException("bad_field", "step " + step.pos + " has no margin, which the hello asked for "
                    + "(options.gate_margin); this gateway may predate gate margins");
        }
        checkShape(step.f, "step.f", 1, ready.backbone.hiddenSize);
        steps.put(step.pos, step);
        if (step.taps != null) {
            expect(hello.gate != null, "step " + step.pos + " pushes taps; the hello did not ask for that");
            pushed.put(step.pos, tapsOf(step.taps, "step.taps"));
            keepExact(step.pos, step.exact, "step.exact");
        }
        lastStepPos = step.pos;
    }

    private void onTaps(Messages.Taps t) throws ProtocolException {
        if (settles && (t.epoch < epoch || t.pos > voidAfter())) {
            return; // asked for before a token we proved changed its draft: void (the gateway drops it too)
        }
        expect(sideState.get(t.pos) == Wait.TAPS, "taps for position " + t.pos + " not asked for");
        expect(t.epoch == epoch, "taps of epoch " + t.epoch + ", expected " + epoch);
        taps.put(t.pos, tapsOf(t.taps, "taps.taps"));
        keepExact(t.pos, t.exact, "taps.exact");
        sideState.put(t.pos, Wait.SIDE);
    }

    /** Taps are len(plugin.taps) rows of H columns, or of r with the cloud-side projection. */
    private float[][] tapsOf(Activation a, String what) throws ProtocolException {
        int cols = hello.projection == null ? ready.backbone.hiddenSize : hello.projection.rank;
        checkShape(a, what, hello.plugin.taps.length, cols);
        return a.values;
    }

    private void onVerdict(Messages.Verdict v) throws ProtocolException {
        // The gateway verifies in order: a verdict is for the first uncommitted position.
        expect(v.pos == nextPos && sideState.get(v.pos) == Wait.VERDICT, "verdict for position " + v.pos + " not expected");
        long draft = steps.get(v.pos).draft;
        expect(v.changed == (v.token != draft), "verdict.changed disagrees with the draft");
        expect(v.epoch == epoch + (v.changed ? 1 : 0), "verdict epoch " + v.epoch + " after epoch " + epoch);
        if (v.secret != null) secret = v.secret; // a refreshed resume token
        commit(v.pos, v.token, v.piece, true);
        if (v.changed) changed(v.pos, v.token, v.epoch); // drafts after pos were built on the old token
        commitSettled();
    }

    /**
     * pos is committed with `token`, not its draft: the new epoch begins. Every later step and
     * decision is void, but a streamed branch line of that token becomes the main line.
     */
    private void changed(long pos, long token, long newEpoch) {
        rollbacks++;
        changedPositions.add(pos);
        dropped += steps.size();
        forgetAfter(pos);
        lastStepPos = pos;
        nextGate = pos + 1;
        sentUpto = Math.min(sentUpto, pos + 1);
        epoch = newEpoch;
        Messages.BranchRef ref = new Messages.BranchRef(pos, token);
        List<Messages.Step> line = branches.remove(ref);
        branches.clear(); // the other lines continued tokens that lost
        if (settles) adopted = ref;
        if (line == null) return;
        for (Messages.Step step : line) { // the branch's drafts, now the main line's in the new epoch
            steps.put(step.pos, step.onMainLine(epoch));
            lastStepPos = step.pos;
        }
        branchAdopted += line.size();
    }

    /**
     * A streamed branch line's draft: kept until its branch point is committed (adopted if the
     * point's token is the line's, dropped otherwise).
     */
    private void onBranchStep(Messages.Step step) throws ProtocolException {
        expect(settles, "step " + step.pos + " streams a branch line; the session does not settle");
        long at = step.branch.pos;
        if (at < nextPos || step.epoch < epoch) return; // its point was committed another way: void
        expect(step.epoch == epoch, "branch step of epoch " + step.epoch + ", expected " + epoch);
        List<Messages.Step> line = branches.get(step.branch);
        if (line == null) branches.put(step.branch, line = new ArrayList<Messages.Step>());
        expect(step.pos == at + 1 + line.size() && step.pos <= at + 1 + window,
                "branch step " + step.pos + " of the line of " + step.branch.token + " at " + at + " out of order");
        checkShape(step.f, "step.f", 1, ready.backbone.hiddenSize);
        line.add(step);
    }

    /** A settling session keeps the exact f of a position whose taps came. */
    private void keepExact(long pos, Activation x, String what) throws ProtocolException {
        if (!settles) return;
        expect(x != null, what + ": missing; the session settles");
        checkShape(x, what, 1, ready.backbone.hiddenSize);
        exact.put(pos, x.values[0]);
    }

    /** Drop every uncommitted decision and step past pos (and queued messages about them). */
    private void forgetAfter(long pos) {
        steps = new TreeMap<Long, Messages.Step>(steps.headMap(pos, true));
        pushed.clear();
        sigma = new TreeMap<Long, Boolean>(sigma.headMap(pos, true));
        sideState = new TreeMap<Long, Wait>(sideState.headMap(pos, true));
        taps = new TreeMap<Long, float[][]>(taps.headMap(pos, true));
        exact = new TreeMap<Long, float[]>(exact.headMap(pos, true));
        heads = new TreeMap<Long, Activation>(heads.headMap(pos, true));
        proven = new TreeMap<Long, Proven>(proven.headMap(pos, true));
        if (pendingAccept != null && pendingAccept > pos) pendingAccept = null;
        for (Iterator<Messages.Message> it = outbox.iterator(); it.hasNext(); ) {
            if (positionOf(it.next()) > pos) it.remove();
        }
    }

    /** The position a queued device message is about. */
    private static long positionOf(Messages.Message m) {
        if (m instanceof Messages.NeedTaps) return ((Messages.NeedTaps) m).pos;
        if (m instanceof Messages.Side) return ((Messages.Side) m).pos;
        if (m instanceof Messages.Settled) return ((Messages.Settled) m).pos;
        if (m instanceof Messages.Accept) return ((Messages.Accept) m).upto;
        return -1;
    }

    private void onEnd(Messages.End e) throws ProtocolException {
        expect(sideState.isEmpty() && steps.isEmpty() && pendingAccept == null, "end while positions are unverified");
        expect(e.tokens() == committed.size(),
                "end reports " + e.tokens() + " tokens, " + committed.size() + " committed");
        end = e;
        phase = Phase.ENDED;
    }

    // ------------------------------------------------------------------ the caller's work

    /**
     * What to compute next, or null until more messages arrive: a proof whose side output is
     * here first, then a side output whose taps are here, then the next gate if fewer than
     * maxInFlight side outputs await their verdict (and no proven change awaits its commit).
     */
    public DeviceAction nextAction() {
        if (phase != Phase.GENERATING) return null;
        for (Map.Entry<Long, Activation> h : heads.entrySet()) {
            if (sideState.get(h.getKey()) == Wait.HEAD) {
                return new DeviceAction.RunHead(h.getKey(), exact.get(h.getKey()), h.getValue().values[0]);
            }
        }
        if (!taps.isEmpty()) {
            long pos = taps.firstKey();
            return new DeviceAction.RunSide(pos, taps.get(pos), hello.projection != null);
        }
        Messages.Step step = steps.get(nextGate);
        if (step == null || inFlight() >= maxInFlight || changePending()) return null;
        return new DeviceAction.RunGate(nextGate, step.f.values[0], hello.options.gateMargin ? step.margin : null);
    }

    /** Report sigma for the position of the last RunGate. */
    public void gated(long pos, boolean open) {
        require(pos == nextGate && steps.containsKey(pos) && inFlight() < maxInFlight, "gated(" + pos + ")");
        nextGate = pos + 1;
        sigma.put(pos, open);
        float[][] pushedTaps = pushed.remove(pos);
        if (!open) {
            pendingAccept = pos;
            commitSettled();
            return;
        }
        sidePositions++;
        pendingAccept = null; // need_taps (or a side for pushed taps) implies it
        sentUpto = pos + 1;
        if (pushedTaps != null) { // the taps came with the step: no need_taps round trip
            pushedUsed++;
            taps.put(pos, pushedTaps);
            sideState.put(pos, Wait.SIDE);
        } else {
            outbox.add(new Messages.NeedTaps(epoch, pos));
            sideState.put(pos, Wait.TAPS);
        }
        maxInFlightSeen = Math.max(maxInFlightSeen, inFlight());
    }

    /** Report s [hidden_size] for the position of a RunSide. */
    public void sideOutput(long pos, float[] s) {
        require(sideState.get(pos) == Wait.SIDE, "sideOutput(" + pos + ")");
        Messages.Options o = hello.options;
        Activation encoded = Activation.of(new float[][] {s}, o.codec, o.outliers);
        taps.remove(pos);
        if (settles && exact.containsKey(pos) && o.temperature == 0) { // try to prove the token first
            heads.put(pos, encoded);
            sideState.put(pos, Wait.HEAD);
            return;
        }
        outbox.add(new Messages.Side(epoch, pos, encoded));
        sideState.put(pos, Wait.VERDICT);
    }

    /**
     * Report the proof of a RunHead: the token of pos and its bytes, or null where the proof
     * does not hold (the side output then goes up, and the verdict decides).
     */
    public void certified(long pos, Long token, byte[] piece) {
        require(sideState.get(pos) == Wait.HEAD, "certified(" + pos + ")");
        Activation encoded = heads.remove(pos);
        exact.remove(pos);
        if (token == null) {
            unproven++;
            outbox.add(new Messages.Side(epoch, pos, encoded));
            sideState.put(pos, Wait.VERDICT);
            return;
        }
        outbox.add(new Messages.Settled(epoch, pos, token));
        sideState.put(pos, Wait.SETTLED);
        proven.put(pos, new Proven(token, piece));
        if (token != steps.get(pos).draft) { // every later decision is void, whatever comes before pos
            forgetAfter(pos);
            lastStepPos = pos;
            nextGate = pos + 1;
            sentUpto = Math.min(sentUpto, pos + 1);
        }
        commitSettled();
    }

    /**
     * A proven token that changes its draft awaits its commit: nothing after it is gated before
     * (its steps are void; the branch line's come in the new epoch).
     */
    private boolean changePending() {
        return voidAfter() != Long.MAX_VALUE;
    }

    /** The position of the earliest proven token that changes its draft (later ones are void), or MAX_VALUE. */
    private long voidAfter() {
        for (Map.Entry<Long, Proven> e : proven.entrySet()) { // ascending
            if (e.getValue().token != steps.get(e.getKey()).draft) return e.getKey();
        }
        return Long.MAX_VALUE;
    }

    /**
     * Messages to send now, in order; a run of sigma = 0 positions becomes one `accept`. Call
     * it when no received message is waiting.
     */
    public List<Messages.Message> flush() {
        if (pendingAccept != null) {
            outbox.add(new Messages.Accept(epoch, pendingAccept));
            sentUpto = pendingAccept + 1;
            pendingAccept = null;
        }
        List<Messages.Message> out = outbox;
        outbox = new ArrayList<Messages.Message>();
        return out;
    }

    // ------------------------------------------------------------------ helpers

    /**
     * Commit, in order, the positions that are settled: sigma = 0 ones (their draft) and proven
     * ones (their token; a change begins the new epoch, as a changed verdict does), until one
     * still awaits its side output or verdict.
     */
    private void commitSettled() {
        while (true) {
            long pos = nextPos;
            if (Boolean.FALSE.equals(sigma.get(pos))) {
                Messages.Step step = steps.get(pos);
                commit(pos, step.draft, step.piece, false);
            } else if (proven.containsKey(pos) && sideState.get(pos) == Wait.SETTLED) {
                Proven p = proven.remove(pos);
                long draft = steps.get(pos).draft;
                settled++; // counted at its commit: a proof voided by an earlier change is not
                commit(pos, p.token, p.piece, true);
                if (p.token != draft) changed(pos, p.token, epoch + 1);
            } else {
                return;
            }
        }
    }

    private void commit(long pos, long token, byte[] piece, boolean side) {
        committed.add(new Commit(pos, token, piece, side));
        steps.remove(pos);
        sigma.remove(pos);
        sideState.remove(pos);
        taps.remove(pos);
        exact.remove(pos);
        heads.remove(pos);
        proven.remove(pos);
        nextPos = pos + 1;
        for (Iterator<Messages.BranchRef> it = branches.keySet().iterator(); it.hasNext(); ) {
            if (it.next().pos < pos) it.remove();
        }
    }

    private static void checkShape(Activation a, String what, int rows, int cols) throws ProtocolException {
        if (a.rows() != rows || a.cols() != cols) {
            throw new ProtocolException("bad_field", what + " has shape (" + a.rows() + ", " + a.cols()
                    + "), expected (" + rows + ", " + cols + ")");
        }
    }

    private static void expect(boolean ok, String what) throws ProtocolException {
        if (!ok) throw new ProtocolException("out_of_order", what);
    }

    private static void require(boolean ok, String what) {
        if (!ok) throw new IllegalStateException("device protocol misuse: " + what); // a bug in the caller
    }
}
