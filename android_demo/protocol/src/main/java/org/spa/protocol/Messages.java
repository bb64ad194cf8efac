package org.spa.protocol;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;

/**
 * Protocol messages, version 3 (docs/PROTOCOL.md section 4; reference
 * spa/protocol/messages.py; the types, directions and codes come from {@link Schema}, generated
 * from spa/protocol/schema.json). {@link #parse} validates every field of an unpacked map and
 * returns the message; {@code toMap()} builds the map to send. Unknown keys are ignored so that
 * a version can gain optional fields. tests/vectors/message_vectors.json (MessageVectorsTest)
 * holds the maps every parser must accept or refuse.
 */
public final class Messages {
    public static final int VERSION = Schema.VERSION;
    public static final String[] CODECS = {"int8", "int4", "f32"};
    public static final String[] END_REASONS = {"eos", "max_tokens"};

    private Messages() {}

    /** Any message; {@link #type()} is its `type` field. */
    public abstract static class Message {
        public abstract String type();

        public abstract Map<String, Object> toMap();

        Map<String, Object> start() {
            Map<String, Object> d = new LinkedHashMap<String, Object>();
            d.put("type", type());
            return d;
        }
    }

    /** Receivers for {@link #parse(Map, String)}: this client is always the device. */
    public static final String DEVICE = "device", GATEWAY = "gateway";
    static final String[] TYPES = Schema.TYPES;
    static final String[] GATEWAY_RECEIVES = Schema.GATEWAY_RECEIVES;
    static final String[] DEVICE_RECEIVES = Schema.DEVICE_RECEIVES;

    /** Validate an unpacked map and return its message, of either direction (tests, tools). */
    public static Message parse(Map<String, Object> d) throws ProtocolException {
        return parse(d, null);
    }

    /**
     * Validate an unpacked map and return its message. {@code receiver} ({@link #DEVICE} or
     * {@link #GATEWAY}): a type that side never receives is `unknown_type`, decided from `type`
     * alone, before any other field is read (docs/PROTOCOL.md section 3); null accepts both
     * directions. A `type` that is missing or not a str is `bad_field` (message.type); any str,
     * however long, that names no message is `unknown_type`.
     */
    public static Message parse(Map<String, Object> d, String receiver) throws ProtocolException {
        Fields f = new Fields(d, "message");
        String kind = f.text("type", -1);
        if (!contains(TYPES, kind)) throw new ProtocolException("unknown_type", "unknown message type " + shown(kind));
        if (receiver != null) {
            String[] receives;
            if (DEVICE.equals(receiver)) receives = DEVICE_RECEIVES;
            else if (GATEWAY.equals(receiver)) receives = GATEWAY_RECEIVES;
            else throw new IllegalArgumentException("receiver must be \"device\" or \"gateway\", not " + receiver);
            if (!contains(receives, kind)) {
                throw new ProtocolException("unknown_type", "the " + receiver + " does not receive " + shown(kind));
            }
        }
        Fields g = new Fields(d, kind);
        if ("hello".equals(kind)) return Hello.read(g);
        if ("accept".equals(kind)) return new Accept(g.integer("epoch"), g.integer("upto"));
        if ("need_taps".equals(kind)) return new NeedTaps(g.integer("epoch"), g.integer("pos"));
        if ("side".equals(kind)) return new Side(g.integer("epoch"), g.integer("pos"), g.activation("s"));
        if ("settled".equals(kind)) return new Settled(g.integer("epoch"), g.integer("pos"), g.integer("token"));
        if ("bye".equals(kind)) return new Bye();
        if ("teach".equals(kind)) return TeachMessages.Teach.read(g); // on-device learning (section 6, "Teaching")
        if ("states".equals(kind)) return TeachMessages.States.read(g);
        if ("ready".equals(kind)) return Ready.read(g);
        if ("step".equals(kind)) return Step.read(g);
        if ("taps".equals(kind)) {
            long epoch = g.integer("epoch"), pos = g.integer("pos");
            Activation taps = g.activation("taps");
            // version 3, settling sessions only: f_pos itself (f32), for the device's proof
            return new Taps(epoch, pos, taps, g.d.get("exact") == null ? null : g.activation("exact"));
        }
        if ("verdict".equals(kind)) {
            return new Verdict(g.integer("epoch"), g.integer("pos"), g.integer("token"), g.blob("piece"), g.flag("changed"),
                    g.d.get("secret") == null ? null : g.text("secret"));
        }
        if ("end".equals(kind)) return End.read(g);
        if ("error".equals(kind)) return new Error(g.text("code"), g.text("message", 4096));
        return Resumed.read(g);
    }

    private static boolean contains(String[] names, String name) {
        for (String n : names) if (n.equals(name)) return true;
        return false;
    }

    /** Longest type name an error text shows whole (a `type` may be megabytes long). */
    static final int SHOWN_TYPE_CHARS = 64;

    /**
     * A type name for an error text, as Python's repr writes it (quotes, escapes), cut to
     * {@link #SHOWN_TYPE_CHARS} code points with the full length said: spa.protocol.messages._shown.
     */
    static String shown(String kind) {
        int n = Fields.codePoints(kind);
        if (n <= SHOWN_TYPE_CHARS) return repr(kind);
        return repr(kind.substring(0, kind.offsetByCodePoints(0, SHOWN_TYPE_CHARS))) + "... (" + n + " characters)";
    }

    /** Python's repr of a str: single quotes unless it holds ' and no ", non-printables escaped. */
    static String repr(String s) {
        char quote = s.indexOf('\'') >= 0 && s.indexOf('"') < 0 ? '"' : '\'';
        StringBuilder b = new StringBuilder(s.length() + 2).append(quote);
        for (int i = 0; i < s.length(); ) {
            int c = s.codePointAt(i);
            i += Character.charCount(c);
            if (c == quote || c == '\\') b.append('\\').appendCodePoint(c);
            else if (c == '\n') b.append("\\n");
            else if (c == '\r') b.append("\\r");
            else if (c == '\t') b.append("\\t");
            else if (printable(c)) b.appendCodePoint(c);
            else if (c < 0x100) b.append(String.format(Locale.ROOT, "\\x%02x", c));
            else if (c < 0x10000) b.append(String.format(Locale.ROOT, "\\u%04x", c));
            else b.append(String.format(Locale.ROOT, "\\U%08x", c));
        }
        return b.append(quote).toString();
    }

    /** Python's str.isprintable for one code point: not Cc, Cf, Cs, Co, Cn, Zl, Zp, nor Zs other than ' '. */
    private static boolean printable(int c) {
        if (c == ' ') return true;
        switch (Character.getType(c)) {
            case Character.CONTROL:
            case Character.FORMAT:
            case Character.SURROGATE:
            case Character.PRIVATE_USE:
            case Character.UNASSIGNED:
            case Character.LINE_SEPARATOR:
            case Character.PARAGRAPH_SEPARATOR:
            case Character.SPACE_SEPARATOR:
                return false;
            default:
                return true;
        }
    }

    // ------------------------------------------------------------------ parts

    public static final class Plugin {
        public final String fingerprint; // backbone fingerprint the plugin was trained on
        public final int[] taps; // layer indices, ascending; 0 = embedding output
        public final String contentHash;

        public Plugin(String fingerprint, int[] taps, String contentHash) {
            this.fingerprint = fingerprint;
            this.taps = taps.clone();
            this.contentHash = contentHash;
        }

        Map<String, Object> toMap() {
            Map<String, Object> d = new LinkedHashMap<String, Object>();
            d.put("fingerprint", fingerprint);
            List<Object> t = new ArrayList<Object>();
            for (int x : taps) t.add((long) x);
            d.put("taps", t);
            d.put("content_hash", contentHash);
            return d;
        }

        static Plugin read(Fields f) throws ProtocolException {
            return new Plugin(f.text("fingerprint"), f.layers("taps"), f.text("content_hash"));
        }
    }

    public static final class Options {
        public int window = 0; // W: drafted-but-unverified positions beyond the first; 0 = lock-step
        public String codec = "int8"; // activation scheme for f, taps and s
        public int outliers = 8; // outlier channels per row
        public int maxNewTokens = 256;
        public double temperature = 0.0; // 0 = greedy
        public long seed = 0; // sampling noise for position t comes from (seed, t)
        // Each step carries the backbone's top-2 logit margin (a margin gate reads it); sent only when true.
        public boolean gateMargin = false;
        // Version 3: the device settles its own side tokens where it can prove them (section 6,
        // "Settlement"); sent only when true, like gate_margin.
        public boolean settle = false;

        Map<String, Object> toMap() {
            Map<String, Object> d = new LinkedHashMap<String, Object>();
            d.put("window", (long) window);
            d.put("codec", codec);
            d.put("outliers", (long) outliers);
            d.put("max_new_tokens", (long) maxNewTokens);
            d.put("temperature", temperature);
            d.put("seed", seed);
            if (gateMargin) d.put("gate_margin", true);
            if (settle) d.put("settle", true);
            return d;
        }

        static Options read(Fields f) throws ProtocolException {
            Options o = new Options();
            o.window = (int) f.integer("window");
            o.codec = f.text("codec", Fields.MAX_NAME, CODECS);
            o.outliers = (int) f.integer("outliers", 0, ActivationCodec.MAX_COLS);
            o.maxNewTokens = (int) f.integer("max_new_tokens", 1, Fields.INT32_MAX);
            o.temperature = f.number("temperature", 0.0);
            o.seed = f.integer("seed", 0, Fields.INT64_MAX);
            o.gateMargin = f.d.get("gate_margin") != null && f.flag("gate_margin");
            o.settle = f.d.get("settle") != null && f.flag("settle");
            return o;
        }
    }

    public static final class Backbone {
        public final String name;
        public final String fingerprint;
        public final int numLayers; // L; taps may name layers 0..L
        public final int hiddenSize; // H; columns of f, taps and s

        public Backbone(String name, String fingerprint, int numLayers, int hiddenSize) {
            this.name = name;
            this.fingerprint = fingerprint;
            this.numLayers = numLayers;
            this.hiddenSize = hiddenSize;
        }

        Map<String, Object> toMap() {
            Map<String, Object> d = new LinkedHashMap<String, Object>();
            d.put("name", name);
            d.put("fingerprint", fingerprint);
            d.put("num_layers", (long) numLayers);
            d.put("hidden_size", (long) hiddenSize);
            return d;
        }

        static Backbone read(Fields f) throws ProtocolException {
            return new Backbone(f.text("name"), f.text("fingerprint"),
                    (int) f.integer("num_layers", 1, Fields.MAX_LAYER),
                    (int) f.integer("hidden_size", 1, ActivationCodec.MAX_COLS));
        }
    }

    // ------------------------------------------------------------------ device -> gateway

    public static final class Hello extends Message {
        public final String token; // "" when the gateway needs none
        public final Plugin plugin;
        public final String prompt; // formatted by the device (chat template included)
        public final Options options;
        public final Resume resume; // null unless continuing a session on a new connection
        public final Projection projection; // the cloud-side projection's weights, or null
        public final GateUpload gate; // the device's gate, for pushed taps, or null
        /** Frame compressions this device reads and writes, preferred first; null: not sent (= zstd). */
        public final List<String> compression;

        public Hello(String token, Plugin plugin, String prompt, Options options) {
            this(token, plugin, prompt, options, null, null, null, null);
        }

        public Hello(String token, Plugin plugin, String prompt, Options options, Resume resume, Projection projection,
                     GateUpload gate, List<String> compression) {
            this.token = token;
            this.plugin = plugin;
            this.prompt = prompt;
            this.options = options;
            this.resume = resume;
            this.projection = projection;
            this.gate = gate;
            this.compression = compression;
        }

        /** The same hello with another resume part (the resume hello of this session). */
        public Hello resuming(Resume r) {
            return new Hello(token, plugin, prompt, options, r, projection, gate, compression);
        }

        @Override
        public String type() {
            return "hello";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("version", (long) VERSION);
            d.put("token", token);
            d.put("plugin", plugin.toMap());
            d.put("prompt", prompt);
            d.put("options", options.toMap());
            if (resume != null) d.put("resume", resume.toMap());
            if (projection != null) d.put("projection", projection.toMap());
            if (gate != null) d.put("gate", gate.toMap());
            if (compression != null) d.put("compression", new ArrayList<Object>(compression));
            return d;
        }

        static Hello read(Fields f) throws ProtocolException {
            // Version first: a hello of another version may have other fields.
            long version = f.integer("version");
            boolean known = false;
            for (int v : Schema.VERSIONS) known |= v == version;
            if (!known) {
                throw new ProtocolException("version", "protocol version " + version + " is not supported (only " + VERSION + ")");
            }
            String token = f.text("token");
            Plugin plugin = Plugin.read(f.map("plugin"));
            String prompt = f.text("prompt", -1);
            Options options = Options.read(f.map("options"));
            Resume resume = f.d.get("resume") == null ? null : Resume.read(f.map("resume"));
            Projection projection = f.d.get("projection") == null ? null : Projection.read(f.map("projection"));
            GateUpload gate = f.d.get("gate") == null ? null : GateUpload.read(f.map("gate"));
            return new Hello(token, plugin, prompt, options, resume, projection, gate, compressionOffer(f));
        }

        /** hello.compression: 1 to 8 names of at most 32 characters (unknown names allowed: the gateway skips them). */
        private static List<String> compressionOffer(Fields f) throws ProtocolException {
            Object v = f.d.get("compression");
            if (v == null) return null;
            boolean ok = v instanceof List && !((List<?>) v).isEmpty() && ((List<?>) v).size() <= 8;
            List<String> out = new ArrayList<String>();
            if (ok) {
                for (Object c : (List<?>) v) {
                    ok &= c instanceof String && !((String) c).isEmpty() && Fields.codePoints((String) c) <= 32;
                    if (ok) out.add((String) c);
                }
            }
            if (!ok) throw f.bad("compression", "expected a list of 1 to 8 names of at most 32 characters");
            return out;
        }
    }

    /** hello.resume: continue a session on a new connection (docs/PROTOCOL.md section 6, Resumption). */
    public static final class Resume {
        public final String session, secret;
        public final Long next; // the first position the device has not committed; null: not sent
        public final long[] tokens; // every committed token id, in order; null: not sent

        public Resume(String session, String secret, Long next, long[] tokens) {
            this.session = session;
            this.secret = secret;
            this.next = next;
            this.tokens = tokens;
        }

        Map<String, Object> toMap() {
            Map<String, Object> d = new LinkedHashMap<String, Object>();
            d.put("session", session);
            d.put("secret", secret);
            if (next != null) d.put("next", next);
            if (tokens != null) {
                java.nio.ByteBuffer b = java.nio.ByteBuffer.allocate(4 * tokens.length).order(java.nio.ByteOrder.LITTLE_ENDIAN);
                for (long t : tokens) b.putInt((int) t);
                d.put("tokens", b.array());
            }
            return d;
        }

        static Resume read(Fields f) throws ProtocolException {
            Long next = f.d.get("next") == null ? null : (Long) f.integer("next");
            long[] tokens = null;
            if (f.d.get("tokens") != null) {
                byte[] raw = f.blob("tokens");
                String why = "expected bin of uint32 little-endian token ids below 2^31";
                if (raw.length % 4 != 0) throw f.bad("tokens", why);
                java.nio.ByteBuffer b = java.nio.ByteBuffer.wrap(raw).order(java.nio.ByteOrder.LITTLE_ENDIAN);
                tokens = new long[raw.length / 4];
                for (int i = 0; i < tokens.length; i++) {
                    tokens[i] = b.getInt() & 0xffffffffL;
                    if (tokens[i] > Fields.INT32_MAX) throw f.bad("tokens", why);
                }
            }
            return new Resume(f.text("session"), f.text("secret"), next, tokens);
        }
    }

    /** hello.projection: the side network's per-tap projections, for the cloud-side projection. */
    public static final class Projection {
        public final int rank; // r
        public final byte[] weight; // float16 LE [len(taps), r, H]; null when named by hash alone
        public final byte[] bias; // float32 LE [len(taps), r]; null when named by hash alone
        public final String hash; // "sha256:" + hex of weight then bias, or null (this client sends the weights)

        public Projection(int rank, byte[] weight, byte[] bias) {
            this(rank, weight, bias, null);
        }

        public Projection(int rank, byte[] weight, byte[] bias, String hash) {
            this.rank = rank;
            this.weight = weight;
            this.bias = bias;
            this.hash = hash;
        }

        /** "sha256:" + hex of weight then bias: what names these weights once a gateway holds them. */
        public String digest() {
            if (weight == null) return hash;
            try {
                java.security.MessageDigest md = java.security.MessageDigest.getInstance("SHA-256");
                md.update(weight);
                md.update(bias);
                StringBuilder sb = new StringBuilder("sha256:");
                for (byte x : md.digest()) sb.append(String.format(Locale.ROOT, "%02x", x & 0xff));
                return sb.toString();
            } catch (java.security.NoSuchAlgorithmException e) {
                throw new IllegalStateException("no SHA-256 on this JVM", e);
            }
        }

        /** The same upload named by its hash alone (docs/PROTOCOL.md section 4, "Cloud-side projection"). */
        public Projection byHash() {
            return new Projection(rank, null, null, digest());
        }

        Map<String, Object> toMap() {
            Map<String, Object> d = new LinkedHashMap<String, Object>();
            d.put("rank", (long) rank);
            if (weight != null) {
                d.put("weight", weight);
                d.put("bias", bias);
            }
            if (hash != null) d.put("hash", hash);
            return d;
        }

        static Projection read(Fields f) throws ProtocolException {
            int rank = (int) f.integer("rank", 1, 4096);
            byte[] weight = f.d.get("weight") == null ? null : f.blob("weight");
            byte[] bias = f.d.get("bias") == null ? null : f.blob("bias");
            String hash = f.d.get("hash") == null ? null : f.text("hash");
            if ((weight == null && bias != null) || (weight == null && hash == null)) {
                throw f.bad("weight", "expected weight and bias, or a hash alone");
            }
            if (bias == null && weight != null) throw f.bad("bias", "expected weight and bias, or a hash alone");
            return new Projection(rank, weight, bias, hash);
        }
    }

    /** hello.gate: the device's gate, uploaded so that the gateway pushes taps with the steps it predicts open. */
    public static final class GateUpload {
        public final byte[] weight; // float32 LE [2, H] ([2, H + 1] for a margin gate)
        public final byte[] bias; // float32 LE [2]
        public final double tau;

        public GateUpload(byte[] weight, byte[] bias, double tau) {
            this.weight = weight;
            this.bias = bias;
            this.tau = tau;
        }

        Map<String, Object> toMap() {
            Map<String, Object> d = new LinkedHashMap<String, Object>();
            d.put("weight", weight);
            d.put("bias", bias);
            d.put("tau", tau);
            return d;
        }

        static GateUpload read(Fields f) throws ProtocolException {
            return new GateUpload(f.blob("weight"), f.blob("bias"), f.number("tau", Double.NEGATIVE_INFINITY));
        }
    }

    public static final class Accept extends Message {
        public final long epoch, upto; // every position <= upto had sigma = 0

        public Accept(long epoch, long upto) {
            this.epoch = epoch;
            this.upto = upto;
        }

        @Override
        public String type() {
            return "accept";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("epoch", epoch);
            d.put("upto", upto);
            return d;
        }
    }

    public static final class NeedTaps extends Message {
        public final long epoch, pos; // sigma = 1 at pos; every position < pos is accepted

        public NeedTaps(long epoch, long pos) {
            this.epoch = epoch;
            this.pos = pos;
        }

        @Override
        public String type() {
            return "need_taps";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("epoch", epoch);
            d.put("pos", pos);
            return d;
        }
    }

    public static final class Side extends Message {
        public final long epoch, pos;
        public final Activation s; // 1 row

        public Side(long epoch, long pos, Activation s) {
            this.epoch = epoch;
            this.pos = pos;
            this.s = s;
        }

        @Override
        public String type() {
            return "side";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("epoch", epoch);
            d.put("pos", pos);
            d.put("s", s.encoded);
            return d;
        }
    }

    /** Version 3: a sigma = 1 position's token, proven on the device (section 6, "Settlement"). */
    public static final class Settled extends Message {
        public final long epoch, pos, token;

        public Settled(long epoch, long pos, long token) {
            this.epoch = epoch;
            this.pos = pos;
            this.token = token;
        }

        @Override
        public String type() {
            return "settled";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("epoch", epoch);
            d.put("pos", pos);
            d.put("token", token);
            return d;
        }
    }

    public static final class Bye extends Message {
        @Override
        public String type() {
            return "bye";
        }

        @Override
        public Map<String, Object> toMap() {
            return start();
        }
    }

    // ------------------------------------------------------------------ gateway -> device

    public static final class Ready extends Message {
        public final String session, secret;
        public final Backbone backbone;
        public final long promptTokens; // P; the first step has pos = P - 1
        public final Map<String, Object> limits; // the gateway's limits, by name
        /** This connection's frame compression from this message on; "zstd" when an older gateway omits it. */
        public final String compression;
        /** Version 3: the gateway accepts `settled` from this session (only if the device asked). */
        public final boolean settle;

        public Ready(String session, String secret, Backbone backbone, long promptTokens, Map<String, Object> limits) {
            this(session, secret, backbone, promptTokens, limits, Frames.ZSTD);
        }

        public Ready(String session, String secret, Backbone backbone, long promptTokens, Map<String, Object> limits,
                     String compression) {
            this(session, secret, backbone, promptTokens, limits, compression, false);
        }

        public Ready(String session, String secret, Backbone backbone, long promptTokens, Map<String, Object> limits,
                     String compression, boolean settle) {
            this.session = session;
            this.secret = secret;
            this.backbone = backbone;
            this.promptTokens = promptTokens;
            this.limits = limits;
            this.compression = compression;
            this.settle = settle;
        }

        @Override
        public String type() {
            return "ready";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("session", session);
            d.put("secret", secret);
            d.put("backbone", backbone.toMap());
            d.put("prompt_tokens", promptTokens);
            d.put("limits", limits);
            d.put("compression", compression);
            if (settle) d.put("settle", true);
            return d;
        }

        static Ready read(Fields f) throws ProtocolException {
            return new Ready(f.text("session"), f.text("secret"), Backbone.read(f.map("backbone")),
                    f.integer("prompt_tokens", 1, Fields.INT32_MAX), f.numbers("limits"),
                    f.d.get("compression") == null ? Frames.ZSTD : f.text("compression", 32), settleOffered(f));
        }
        private static boolean settleOffered(Fields f) throws ProtocolException {
            return f.d.get("settle") != null && f.flag("settle");
        }
    }

    public static final class Step extends Message {
        public final long epoch, pos; // t
        public final Activation f; // f_t, 1 row
        public final long draft; // the backbone's x_{t+1}, kept if sigma_t = 0
        public final byte[] piece; // UTF-8 bytes of the draft, possibly a partial character
        public final Float margin; // the backbone's top-2 logit margin at pos (options.gate_margin), else null
        public final Activation taps; // pushed taps of pos (hello.gate), else null
        public final String secret; // a refreshed resume token, else null
        // Version 3, a settling session: f_t itself (f32) with pushed taps, else null; and which branch
        // line this step belongs to (null: the main line's).
        public final Activation exact;
        public final BranchRef branch;

        public Step(long epoch, long pos, Activation f, long draft, byte[] piece) {
            this(epoch, pos, f, draft, piece, null, null, null);
        }

        public Step(long epoch, long pos, Activation f, long draft, byte[] piece, Float margin) {
            this(epoch, pos, f, draft, piece, margin, null, null);
        }

        public Step(long epoch, long pos, Activation f, long draft, byte[] piece, Float margin, Activation taps,
                    String secret) {
            this(epoch, pos, f, draft, piece, margin, taps, secret, null, null);
        }

        public Step(long epoch, long pos, Activation f, long draft, byte[] piece, Float margin, Activation taps,
                    String secret, Activation exact, BranchRef branch) {
            this.epoch = epoch;
            this.pos = pos;
            this.f = f;
            this.draft = draft;
            this.piece = piece;
            this.margin = margin;
            this.taps = taps;
            this.secret = secret;
            this.exact = exact;
            this.branch = branch;
        }

        /** This step in epoch e on the main line (a branch line a change adopted). */
        Step onMainLine(long e) {
            return new Step(e, pos, f, draft, piece, margin, taps, secret, exact, null);
        }

        @Override
        public String type() {
            return "step";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("epoch", epoch);
            d.put("pos", pos);
            d.put("f", f.encoded);
            d.put("draft", draft);
            d.put("piece", piece);
            if (taps != null) d.put("taps", taps.encoded);
            if (exact != null) d.put("exact", exact.encoded);
            if (branch != null) d.put("branch", branch.toMap());
            if (secret != null) d.put("secret", secret);
            if (margin != null) d.put("margin", (double) margin);
            return d;
        }

        static Step read(Fields g) throws ProtocolException {
            long epoch = g.integer("epoch"), pos = g.integer("pos");
            Activation f = g.activation("f");
            long draft = g.integer("draft");
            byte[] piece = g.blob("piece");
            Activation taps = g.d.get("taps") == null ? null : g.activation("taps");
            // version 3, sent only to a settling device
            Activation exact = g.d.get("exact") == null ? null : g.activation("exact");
            BranchRef branch = g.d.get("branch") == null ? null : BranchRef.read(g.map("branch"));
            String secret = g.d.get("secret") == null ? null : g.text("secret");
            Float margin = g.d.get("margin") == null ? null : (Float) g.float32("margin", 0.0);
            return new Step(epoch, pos, f, draft, piece, margin, taps, secret, exact, branch);
        }
    }

    public static final class Taps extends Message {
        public final long epoch, pos;
        public final Activation taps; // one row per tapped layer, in plugin.taps order
        public final Activation exact; // version 3, a settling session: f_pos itself (f32), else null

        public Taps(long epoch, long pos, Activation taps) {
            this(epoch, pos, taps, null);
        }

        public Taps(long epoch, long pos, Activation taps, Activation exact) {
            this.epoch = epoch;
            this.pos = pos;
            this.taps = taps;
            this.exact = exact;
        }

        @Override
        public String type() {
            return "taps";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("epoch", epoch);
            d.put("pos", pos);
            d.put("taps", taps.encoded);
            if (exact != null) d.put("exact", exact.encoded);
            return d;
        }
    }

    /** Which branch line a streamed step belongs to: the continuation of `token` at branch point `pos`. */
    public static final class BranchRef {
        public final long pos, token;

        public BranchRef(long pos, long token) {
            this.pos = pos;
            this.token = token;
        }

        Map<String, Object> toMap() {
            Map<String, Object> d = new LinkedHashMap<String, Object>();
            d.put("pos", pos);
            d.put("token", token);
            return d;
        }

        static BranchRef read(Fields f) throws ProtocolException {
            return new BranchRef(f.integer("pos"), f.integer("token"));
        }

        @Override
        public boolean equals(Object o) {
            return o instanceof BranchRef && ((BranchRef) o).pos == pos && ((BranchRef) o).token == token;
        }

        @Override
        public int hashCode() {
            return Long.valueOf(pos * 31 + token).hashCode();
        }
    }

    public static final class Verdict extends Message {
        public final long epoch; // the epoch after the verdict: old + 1 when changed
        public final long pos;
        public final long token; // the committed x_{pos+1}
        public final byte[] piece;
        public final boolean changed; // token != the draft; drafts after pos are void
        public final String secret; // a refreshed resume token, else null

        public Verdict(long epoch, long pos, long token, byte[] piece, boolean changed) {
            this(epoch, pos, token, piece, changed, null);
        }

        public Verdict(long epoch, long pos, long token, byte[] piece, boolean changed, String secret) {
            this.epoch = epoch;
            this.pos = pos;
            this.token = token;
            this.piece = piece;
            this.changed = changed;
            this.secret = secret;
        }

        @Override
        public String type() {
            return "verdict";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("epoch", epoch);
            d.put("pos", pos);
            d.put("token", token);
            d.put("piece", piece);
            d.put("changed", changed);
            if (secret != null) d.put("secret", secret);
            return d;
        }
    }

    public static final class End extends Message {
        public final String reason; // "eos" | "max_tokens"
        public final Map<String, Object> stats; // always "tokens" (an int)

        public End(String reason, Map<String, Object> stats) {
            this.reason = reason;
            this.stats = stats;
        }

        /** stats.tokens, checked to be an int when parsed. */
        public long tokens() {
            return ((Number) stats.get("tokens")).longValue();
        }

        @Override
        public String type() {
            return "end";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("reason", reason);
            d.put("stats", stats);
            return d;
        }

        static End read(Fields f) throws ProtocolException {
            End end = new End(f.text("reason", Fields.MAX_NAME, END_REASONS), f.numbers("stats"));
            if (!(end.stats.get("tokens") instanceof Long)) {
                throw new ProtocolException("bad_field", "end.stats.tokens: expected an int");
            }
            return end;
        }
    }

    /** Answer to a hello with resume (docs/PROTOCOL.md section 6, Resumption), instead of ready. */
    public static final class Resumed extends Message {
        public final String session;
        public final String secret; // the new resume token
        public final long epoch; // the gateway's epoch from now on
        public final long pos; // the first position the gateway has not verified
        public final List<Commit> commits; // verified positions the device had not committed, from its `next`
        public final String compression;

        public Resumed(String session, String secret, long epoch, long pos, List<Commit> commits, String compression) {
            this.session = session;
            this.secret = secret;
            this.epoch = epoch;
            this.pos = pos;
            this.commits = commits;
            this.compression = compression;
        }

        @Override
        public String type() {
            return "resumed";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("session", session);
            d.put("secret", secret);
            d.put("epoch", epoch);
            d.put("pos", pos);
            List<Object> cs = new ArrayList<Object>();
            for (Commit c : commits) {
                Map<String, Object> m = new LinkedHashMap<String, Object>();
                m.put("pos", c.pos);
                m.put("token", c.token);
                m.put("piece", c.piece);
                m.put("sigma", c.sigma);
                cs.add(m);
            }
            if (!cs.isEmpty()) d.put("commits", cs);
            d.put("compression", compression);
            return d;
        }

        static Resumed read(Fields f) throws ProtocolException {
            String session = f.text("session"), secret = f.text("secret");
            long epoch = f.integer("epoch"), pos = f.integer("pos");
            Object raw = f.d.get("commits");
            List<Commit> commits = new ArrayList<Commit>();
            if (raw != null) {
                if (!(raw instanceof List) || ((List<?>) raw).size() > MAX_RESUMED_COMMITS) {
                    throw f.bad("commits", "expected a list of at most " + MAX_RESUMED_COMMITS + " commits");
                }
                List<?> list = (List<?>) raw;
                for (int i = 0; i < list.size(); i++) {
                    Fields c = new Fields(list.get(i), "resumed.commits[" + i + "]");
                    long cpos = c.integer("pos"), token = c.integer("token");
                    byte[] piece = c.blob("piece");
                    // sigma absent (the gateway rebuilt the session and does not know it): counted as 0
                    boolean sigma = c.d.get("sigma") != null && c.flag("sigma");
                    commits.add(new Commit(cpos, token, piece, sigma));
                }
            }
            String compression = f.d.get("compression") == null ? Frames.ZSTD : f.text("compression", 32);
            return new Resumed(session, secret, epoch, pos, commits, compression);
        }
    }

    static final int MAX_RESUMED_COMMITS = 1 << 16;

    // ------------------------------------------------------------------ either direction

    public static final class Error extends Message {
        public final String code; // receivers accept codes they do not know
        public final String message;

        public Error(String code, String message) {
            this.code = code;
            this.message = message;
        }

        /** The error message for a violation we detected (message cut to 4096 characters). */
        public static Error of(ProtocolException e) {
            String m = e.detail;
            if (Fields.codePoints(m) > 4096) m = m.substring(0, m.offsetByCodePoints(0, 4096));
            return new Error(e.code, m);
        }

        @Override
        public String type() {
            return "error";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("code", code);
            d.put("message", message);
            return d;
        }
    }
}
