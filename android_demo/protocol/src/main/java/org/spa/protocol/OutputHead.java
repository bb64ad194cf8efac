package org.spa.protocol;

import java.io.File;
import java.io.IOException;
import java.io.RandomAccessFile;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.FloatBuffer;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.Arrays;
import java.util.Map;

/**
 * The backbone's output head on the device (the final norm and lm_head, float32) and the proof that
 * settles a side token here: the Java port of spa/model/output_head.py. {@link #certify} returns the
 * greedy token of lm_head(norm(f + s)) only when it provably is the gateway's, else null.
 *
 * <p>The file is the one {@code OutputHead.save} writes ({@link #cachedPath} says where the cache keeps
 * it). The [V, H] weight is memory-mapped, never copied onto the heap (SmolLM2: 113 MB, Gemma-3: 671 MB);
 * the heap holds the norm, the bias, the row L1 norms (double[V]) and the pieces' offsets. One instance
 * may be shared by threads: {@link #certify} is synchronized (it reuses [V]-sized scratch arrays).
 */
public final class OutputHead {
    /** The outcome of {@link #certify} for one position. */
    public static final class Certified {
        public final Integer token; // the gateway's token, proven; null: not provable
        public final int best;      // the device's own argmax
        public final double gap;    // its logit minus the runner-up's
        public final double slack;  // > 0 exactly when proven

        Certified(Integer token, int best, double gap, double slack) {
            this.token = token;
            this.best = best;
            this.gap = gap;
            this.slack = slack;
        }

        @Override
        public String toString() {
            return "Certified(token=" + token + ", best=" + best + ", gap=" + gap + ", slack=" + slack + ")";
        }
    }

    private static final double U = Math.pow(2, -24); // unit roundoff of float32
    private static final long MAX_CHUNK_BYTES = Integer.MAX_VALUE; // one mapping holds at most 2 GiB

    public final String fingerprint;
    public final int vocabSize, hiddenSize;

    private final FloatBuffer[] chunks; // the weight, rowsPerChunk rows each (the last may hold fewer)
    private final int rowsPerChunk;
    private final float[] normFactor; // norm_offset + norm_weight, in float32
    private final float eps;
    private final float[] bias; // null: none
    private final double softcap, scale; // 0: none
    private final double c; // the rounding bound's constant (see certify)
    private final double[] rowL1; // ||W_v||_1, for the cheap first bound
    private final ByteBuffer pieceBytes;
    private final int[] pieceStarts; // token v's bytes are [pieceStarts[v], pieceStarts[v + 1]); null: no pieces
    // scratch for certify (guarded by this)
    private double[] zRaw, zOut, errOut;
    private float[] row;

    private OutputHead(String fingerprint, int vocabSize, int hiddenSize, FloatBuffer[] chunks, int rowsPerChunk,
                       float[] normFactor, float eps, float[] bias, double softcap, double scale,
                       ByteBuffer pieceBytes, int[] pieceStarts) {
        this.fingerprint = fingerprint;
        this.vocabSize = vocabSize;
        this.hiddenSize = hiddenSize;
        this.chunks = chunks;
        this.rowsPerChunk = rowsPerChunk;
        this.normFactor = normFactor;
        this.eps = eps;
        this.bias = bias;
        this.softcap = softcap;
        this.scale = scale;
        this.pieceBytes = pieceBytes;
        this.pieceStarts = pieceStarts;
        int h = hiddenSize;
        double gamma = h * U / (1 - h * U);
        this.c = (2 * gamma + (h + 12) * U) * (1 + (h + 12) * U) * 1.05; // 5 % to spare
        this.rowL1 = rowNorms();
    }

    // --- files ----------------------------------------------------------------------------------------

    /** The head in this file (as spa.model.output_head.OutputHead.save writes it). Throws an IOException
     *  naming the file and what is wrong: unreadable, not safetensors, a tensor missing or of the wrong
     *  dtype or shape, truncated data, missing metadata. */
    public static OutputHead load(File file) throws IOException {
        return load(file, MAX_CHUNK_BYTES);
    }

    /** As {@link #load(File)}, the weight mapped in chunks of at most maxChunkBytes (tests use small ones). */
    static OutputHead load(File file, long maxChunkBytes) throws IOException {
        String what = "output head " + file.getPath();
        RandomAccessFile raf;
        try {
            raf = new RandomAccessFile(file, "r");
        } catch (IOException e) {
            throw new IOException("cannot read the " + what + ": " + e.getMessage(), e);
        }
        try {
            FileChannel ch = raf.getChannel();
            Safetensors.Header header = Safetensors.readHeader(ch, what);
            Map<String, String> meta = header.metadata;
            Safetensors.Entry w = tensor(header, "weight", "F32", 2, what);
            if (w.shape[0] < 2 || w.shape[0] > Integer.MAX_VALUE || w.shape[1] < 1 || w.shape[1] > 1 << 20) {
                throw new IOException(what + ": weight has shape " + Arrays.toString(w.shape) + ", expected [V >= 2, H]");
            }
            int v = (int) w.shape[0], h = (int) w.shape[1];
            float[] normWeight = floats(ch, header, tensor(header, "norm_weight", "F32", 1, what), h, what);
            float[] bias = null;
            if (header.tensors.containsKey("bias")) bias = floats(ch, header, tensor(header, "bias", "F32", 1, what), v, what);
            Safetensors.Entry lengths = tensor(header, "piece_lengths", "I64", 1, what);
            Safetensors.Entry bytes = tensor(header, "piece_bytes", "U8", 1, what);
            if (lengths.numel != v && lengths.numel != 0) {
                throw new IOException(what + ": piece_lengths has " + lengths.numel + " entries for a vocabulary of " + v);
            }
            if (bytes.numel > Integer.MAX_VALUE) throw new IOException(what + ": piece_bytes over 2 GiB");
            int[] starts = null;
            if (lengths.numel == v) {
                ByteBuffer lb = map(ch, header, lengths);
                starts = new int[v + 1];
                long at = 0;
                for (int i = 0; i < v; i++) {
                    long n = lb.getLong(8 * i);
                    at += n;
                    if (n < 0 || at > bytes.numel) {
                        throw new IOException(what + ": piece_lengths do not fit piece_bytes (" + bytes.numel + " bytes)");
                    }
                    starts[i + 1] = (int) at;
                }
            }
            ByteBuffer pieceBytes = map(ch, header, bytes);

            float eps = (float) number(meta, "eps", what, false);
            float offset = (float) number(meta, "norm_offset", what, false);
            double softcap = number(meta, "softcap", what, true), scale = number(meta, "scale", what, true);
            String fingerprint = meta.get("fingerprint");
            if (fingerprint == null) throw new IOException(what + ": metadata lacks fingerprint");
            float[] normFactor = new float[h];
            for (int i = 0; i < h; i++) normFactor[i] = offset + normWeight[i];

            // The weight, mapped read-only (the mapping outlives the channel); whole rows per chunk.
            long rowBytes = 4L * h;
            int rowsPerChunk = (int) Math.min(v, Math.max(1, maxChunkBytes / rowBytes));
            int n = (v + rowsPerChunk - 1) / rowsPerChunk;
            FloatBuffer[] chunks = new FloatBuffer[n];
            for (int k = 0; k < n; k++) {
                long rows = Math.min(rowsPerChunk, v - (long) k * rowsPerChunk);
                long at = header.dataStart + w.begin + (long) k * rowsPerChunk * rowBytes;
                chunks[k] = ch.map(FileChannel.MapMode.READ_ONLY, at, rows * rowBytes).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer();
            }
            return new OutputHead(fingerprint, v, h, chunks, rowsPerChunk, normFactor, eps, bias, softcap, scale,
                    pieceBytes, starts);
        } finally {
            raf.close();
        }
    }

    private static Safetensors.Entry tensor(Safetensors.Header header, String name, String dtype, int dims, String what)
            throws IOException {
        Safetensors.Entry e = header.tensors.get(name);
        if (e == null) throw new IOException(what + ": tensor " + name + " is missing");
        if (!e.dtype.equals(dtype)) throw new IOException(what + ": tensor " + name + " is " + e.dtype + ", expected " + dtype);
        if (e.shape.length != dims) {
            throw new IOException(what + ": tensor " + name + " has shape " + Arrays.toString(e.shape) + ", expected " + dims + " dimension(s)");
        }
        return e;
    }

    private static ByteBuffer map(FileChannel ch, Safetensors.Header header, Safetensors.Entry e) throws IOException {
        return ch.map(FileChannel.MapMode.READ_ONLY, header.dataStart + e.begin, e.end - e.begin).order(ByteOrder.LITTLE_ENDIAN);
    }

    private static float[] floats(FileChannel ch, Safetensors.Header header, Safetensors.Entry e, int n, String what)
            throws IOException {
        if (e.numel != n) throw new IOException(what + ": tensor " + e.name + " has shape " + Arrays.toString(e.shape) + ", expected [" + n + "]");
        float[] out = new float[n];
        map(ch, header, e).asFloatBuffer().get(out);
        return out;
    }

    /** A metadata number (repr of a Python float); "None" (where allowed) is 0: no transform. */
    private static double number(Map<String, String> meta, String key, String what, boolean noneAllowed) throws IOException {
        String s = meta.get(key);
        if (s == null) throw new IOException(what + ": metadata lacks " + key);
        if (noneAllowed && s.equals("None")) return 0;
        try {
            double x = Double.parseDouble(s.trim());
            if (Double.isNaN(x)) throw new NumberFormatException();
            return x;
        } catch (NumberFormatException e) {
            throw new IOException(what + ": metadata " + key + " is " + s + ", not a number");
        }
    }

    /** Where the output head of the backbone with this fingerprint is cached, as spa.model.output_head.head_path:
     *  {@code <cache>/heads/<fingerprint>.safetensors} (the fingerprint replaced by sha256(fingerprint)[:32] hex
     *  when it is not alphanumeric); cache: $SPA_CACHE_DIR, else $XDG_CACHE_HOME/spa, else ~/.cache/spa. */
    public static File cachedPath(String fingerprint) {
        File cache;
        String spa = System.getenv("SPA_CACHE_DIR"), xdg = System.getenv("XDG_CACHE_HOME"), home = System.getenv("HOME");
        if (spa != null && !spa.isEmpty()) {
            cache = new File(spa);
        } else {
            if (home == null || home.isEmpty()) home = System.getProperty("user.home"); // Python's Path.home() reads $HOME first
            File base = xdg != null && !xdg.isEmpty() ? new File(xdg) : new File(home, ".cache");
            cache = new File(base, "spa");
        }
        String safe = isAlnum(fingerprint) ? fingerprint : sha256Hex(fingerprint).substring(0, 32);
        return new File(new File(cache, "heads"), safe + ".safetensors");
    }

    /** Python's str.isalnum(): non-empty, every character a letter or a number. */
    private static boolean isAlnum(String s) {
        if (s.isEmpty()) return false;
        for (int i = 0; i < s.length(); ) {
            int cp = s.codePointAt(i);
            int t = Character.getType(cp);
            if (!Character.isLetter(cp) && t != Character.DECIMAL_DIGIT_NUMBER && t != Character.LETTER_NUMBER
                    && t != Character.OTHER_NUMBER) return false;
            i += Character.charCount(cp);
        }
        return true;
    }

    private static String sha256Hex(String s) {
        try {
            byte[] d = MessageDigest.getInstance("SHA-256").digest(s.getBytes(StandardCharsets.UTF_8));
            StringBuilder out = new StringBuilder();
            for (byte b : d) out.append(String.format("%02x", b & 0xff));
            return out.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    /** The bytes of a token (a settled token is shown without the gateway's help). */
    public byte[] piece(int token) {
        if (token < 0 || token >= vocabSize) throw new IndexOutOfBoundsException("token " + token + " of " + vocabSize);
        if (pieceStarts == null) throw new IllegalStateException("the output head " + fingerprint + " holds no token pieces");
        byte[] out = new byte[pieceStarts[token + 1] - pieceStarts[token]];
        for (int i = 0; i < out.length; i++) out[i] = pieceBytes.get(pieceStarts[token] + i);
        return out;
    }

    // --- what the gateway computes --------------------------------------------------------------------

    /** norm(x) exactly as spa's `normalized`: float32 elementwise; the mean of squares summed in double. */
    float[] normalized(float[] x) {
        double sum = 0;
        for (float v : x) sum += v * v; // x * x rounds in float32, as numpy's
        float var = (float) sum / (float) x.length;
        float inv = (float) (1.0 / (float) Math.sqrt(var + eps)); // correctly rounded float32 sqrt and division
        float[] y = new float[x.length];
        for (int i = 0; i < x.length; i++) y[i] = (x[i] * inv) * normFactor[i];
        return y;
    }

    // --- the proof ------------------------------------------------------------------------------------

    /**
     * The greedy token of lm_head(norm(f + s)) if provably the gateway's (f: the exact f_t, s: the side
     * output as the gateway decodes it, both [H] float32); the returned token is null otherwise.
     *
     * <p>Why it is sound (spa/model/output_head.py's docstring has the derivation): the elementwise float32
     * steps round the same everywhere; each logit's reduction, here or on the gateway in any order, is
     * within err_v = c * S_v of the exact one (S_v = sum_i |W_vi y_i|). So if z_w - err_w > z_v + err_v
     * for every v != w, the gateway's argmax is w. S_v is bounded by ||W_v||_1 max|y| first, and computed
     * exactly for the rivals that bound leaves; softcap and scale are monotone.
     */
    public synchronized Certified certify(float[] f, float[] s) {
        int h = hiddenSize, v = vocabSize;
        if (f.length != h || s.length != h) {
            throw new IllegalArgumentException("certify needs f and s of " + h + " channels, got " + f.length + " and " + s.length);
        }
        float[] x = new float[h];
        for (int i = 0; i < h; i++) x[i] = f[i] + s[i]; // as the cloud adds, in float32
        float[] y = normalized(x);
        double[] yd = new double[h];
        double maxAbs = 0;
        for (int i = 0; i < h; i++) {
            yd[i] = y[i];
            maxAbs = Math.max(maxAbs, Math.abs(yd[i])); // NaN propagates: nothing is proven
        }
        if (zRaw == null) {
            zRaw = new double[v];
            zOut = new double[v];
            errOut = new double[v];
            row = new float[h];
        }
        double[] z = zRaw, zt = zOut, err = errOut;
        logits(yd, z);
        if (bias != null) for (int t = 0; t < v; t++) z[t] += bias[t];
        double[] pair = new double[2];
        int best = 0;
        for (int t = 0; t < v; t++) {
            monotone(z[t], c * rowL1[t] * maxAbs, pair); // every row, cheaply
            zt[t] = pair[0];
            err[t] = pair[1];
            if (zt[t] > zt[best] || (zt[t] != zt[t] && zt[best] == zt[best])) best = t; // np.argmax: the first max (or NaN)
        }
        double second = Double.NEGATIVE_INFINITY;
        for (int t = 0; t < v; t++) if (t != best && !(zt[t] <= second)) second = zt[t];
        double gap = zt[best] - second;
        // Rivals: tokens the cheap bound cannot rule out; their bound is computed exactly.
        double floor = zt[best] - err[best];
        int rivals = 0;
        for (int t = 0; t < v; t++) if (zt[t] + err[t] >= floor) rivals++;
        if (rivals > 1) {
            double[] ay = new double[h];
            for (int i = 0; i < h; i++) ay[i] = Math.abs(yd[i]);
            for (int t = 0; t < v; t++) {
                if (!(zt[t] + err[t] >= floor)) continue;
                monotone(z[t], c * absRowDot(t, ay), pair); // around the raw logit, as Python
                err[t] = pair[1];
            }
        }
        double reach = Double.NEGATIVE_INFINITY;
        for (int t = 0; t < v; t++) if (t != best && !(zt[t] + err[t] <= reach)) reach = zt[t] + err[t];
        double slack = zt[best] - err[best] - reach;
        return new Certified(slack > 0 ? Integer.valueOf(best) : null, best, gap, slack);
    }

    /** The family's monotone transforms after lm_head, applied to a logit and its bound: out = {z, err}. */
    private void monotone(double z, double err, double[] out) {
        if (softcap != 0) {
            double cap = softcap;
            double lo = Math.tanh((z - err) / cap) * cap, hi = Math.tanh((z + err) / cap) * cap;
            z = Math.tanh(z / cap) * cap;
            err = Math.max(z - lo, hi - z) + 8 * U * cap; // tanh rounds within a few ulps
        }
        if (scale != 0) {
            err = err * Math.abs(scale) + 2 * U * Math.abs(z * scale);
            z = z * scale;
        }
        out[0] = z;
        out[1] = err;
    }

    /** z = W y, each dot product summed in double (exact products, 8 accumulators); the rows are bulk-read
     *  one at a time into a reused array (measured faster than blocks of rows: the row stays in L1). */
    private void logits(double[] y, double[] z) {
        int h = hiddenSize;
        float[] buf = row;
        for (int k = 0; k < chunks.length; k++) {
            FloatBuffer src = chunks[k].duplicate(); // its own position, from 0
            int first = k * rowsPerChunk, rows = Math.min(rowsPerChunk, vocabSize - first);
            for (int r = 0; r < rows; r++) {
                src.get(buf, 0, h);
                z[first + r] = dot(buf, 0, y, h);
            }
        }
    }

    private static double dot(float[] w, int off, double[] y, int h) {
        double a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
        int i = 0;
        for (; i + 7 < h; i += 8) {
            int k = off + i;
            a0 += w[k] * y[i];
            a1 += w[k + 1] * y[i + 1];
            a2 += w[k + 2] * y[i + 2];
            a3 += w[k + 3] * y[i + 3];
            a4 += w[k + 4] * y[i + 4];
            a5 += w[k + 5] * y[i + 5];
            a6 += w[k + 6] * y[i + 6];
            a7 += w[k + 7] * y[i + 7];
        }
        for (; i < h; i++) a0 += w[off + i] * y[i];
        return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7));
    }

    /** sum_i |W_ti| * ay_i (ay = |y|), in double. */
    private double absRowDot(int t, double[] ay) {
        FloatBuffer src = chunks[t / rowsPerChunk];
        int at = (t % rowsPerChunk) * hiddenSize;
        double sum = 0;
        for (int i = 0; i < hiddenSize; i++) sum += Math.abs(src.get(at + i)) * ay[i];
        return sum;
    }

    /** ||W_v||_1 for every row, in double (one pass over the mapped weight at load). */
    private double[] rowNorms() {
        int h = hiddenSize;
        double[] out = new double[vocabSize];
        float[] buf = new float[h];
        for (int k = 0; k < chunks.length; k++) {
            FloatBuffer src = chunks[k].duplicate();
            int first = k * rowsPerChunk, rows = Math.min(rowsPerChunk, vocabSize - first);
            for (int r = 0; r < rows; r++) {
                src.get(buf, 0, h);
                double sum = 0;
                for (int i = 0; i < h; i++) sum += Math.abs(buf[i]);
                out[first + r] = sum;
            }
        }
        return out;
    }
}
