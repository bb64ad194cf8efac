package org.spa.protocol;

import java.math.BigInteger;
import java.util.List;
import java.util.Map;

/**
 * Typed, validated access to one unpacked msgpack map (a port of the Python
 * `_Fields`). Every defect is ProtocolException("bad_field", "<path>.<name>: <why>").
 */
final class Fields {
    static final long INT32_MAX = Integer.MAX_VALUE; // positions, epochs, token ids, counts
    static final long INT64_MAX = Long.MAX_VALUE; // seeds
    static final int MAX_LAYER = 1024;
    static final int MAX_NAME = 256; // ids, fingerprints, hashes, codes

    final Map<?, ?> d;
    final String path;

    Fields(Object d, String path) throws ProtocolException {
        if (!(d instanceof Map)) throw new ProtocolException("bad_field", path + ": expected a map");
        this.d = (Map<?, ?>) d;
        this.path = path;
    }

    Object get(String name) throws ProtocolException {
        if (!d.containsKey(name)) throw new ProtocolException("bad_field", path + "." + name + ": missing");
        return d.get(name);
    }

    ProtocolException bad(String name, String why) {
        return new ProtocolException("bad_field", path + "." + name + ": " + why);
    }

    long integer(String name) throws ProtocolException {
        return integer(name, 0, INT32_MAX);
    }

    /** A msgpack integer in [lo, hi]; a bool or float is not an int. */
    long integer(String name, long lo, long hi) throws ProtocolException {
        Object v = get(name);
        if (!(v instanceof Long) || (Long) v < lo || (Long) v > hi) {
            throw bad(name, "expected an int in [" + lo + ", " + hi + "]");
        }
        return (Long) v;
    }

    /** A finite msgpack float or integer >= lo. */
    double number(String name, double lo) throws ProtocolException {
        Object v = get(name);
        double x = isNumber(v) ? ((Number) v).doubleValue() : Double.NaN;
        if (Double.isNaN(x) || Double.isInfinite(x) || x < lo) {
            throw bad(name, "expected a finite number" + (lo == Double.NEGATIVE_INFINITY ? "" : " >= " + shown(lo)));
        }
        return x;
    }

    /** A number >= lo read as a float32, whatever width it was packed with; finite as a float32 too. */
    float float32(String name, double lo) throws ProtocolException {
        double x = number(name, lo);
        if (Math.abs(x) > Float.MAX_VALUE) throw bad(name, "expected a finite float32");
        return (float) x;
    }

    /** A bound as Python's {@code :g} writes the usual ones: 0, not 0.0. */
    static String shown(double x) {
        if (x == Math.rint(x) && Math.abs(x) < 1e15) return String.valueOf((long) x);
        return String.valueOf(x);
    }

    boolean flag(String name) throws ProtocolException {
        Object v = get(name);
        if (!(v instanceof Boolean)) throw bad(name, "expected a bool");
        return (Boolean) v;
    }

    /** A str of at most maxLen characters (code points, as Python counts); maxLen < 0: no limit. */
    String text(String name, int maxLen, String... choices) throws ProtocolException {
        Object v = get(name);
        if (!(v instanceof String) || (maxLen >= 0 && codePoints((String) v) > maxLen)) {
            throw bad(name, "expected a str" + (maxLen < 0 ? "" : " of at most " + maxLen + " characters"));
        }
        if (choices.length > 0) {
            for (String c : choices) if (c.equals(v)) return (String) v;
            StringBuilder sb = new StringBuilder();
            for (String c : choices) sb.append(sb.length() == 0 ? "" : ", ").append(c);
            throw bad(name, "expected one of " + sb);
        }
        return (String) v;
    }

    String text(String name) throws ProtocolException {
        return text(name, MAX_NAME);
    }

    byte[] blob(String name) throws ProtocolException {
        Object v = get(name);
        if (!(v instanceof byte[])) throw bad(name, "expected bin (bytes)");
        return (byte[]) v;
    }

    Fields map(String name) throws ProtocolException {
        return new Fields(get(name), path + "." + name);
    }

    /** A map of str -> finite number (stats, limits). */
    @SuppressWarnings("unchecked")
    Map<String, Object> numbers(String name) throws ProtocolException {
        Object v = get(name);
        boolean ok = v instanceof Map;
        if (ok) {
            for (Map.Entry<?, ?> e : ((Map<?, ?>) v).entrySet()) {
                Object x = e.getValue();
                if (!(e.getKey() instanceof String) || !isNumber(x)
                        || (x instanceof Double && (((Double) x).isNaN() || ((Double) x).isInfinite()))) {
                    ok = false;
                    break;
                }
            }
        }
        if (!ok) throw bad(name, "expected a map of str to finite numbers");
        return (Map<String, Object>) v;
    }

    /** A non-empty, strictly ascending list of layer indices in [0, MAX_LAYER]. */
    int[] layers(String name) throws ProtocolException {
        Object v = get(name);
        String why = "expected a non-empty ascending list of ints in [0, " + MAX_LAYER + "]";
        if (!(v instanceof List) || ((List<?>) v).isEmpty()) throw bad(name, why);
        List<?> list = (List<?>) v;
        int[] out = new int[list.size()];
        for (int i = 0; i < out.length; i++) {
            Object x = list.get(i);
            if (!(x instanceof Long) || (Long) x < 0 || (Long) x > MAX_LAYER) throw bad(name, why);
            out[i] = (int) (long) (Long) x;
            if (i > 0 && out[i] <= out[i - 1]) throw bad(name, why);
        }
        return out;
    }

    /** An encoded activation, decoded once to validate it. */
    Activation activation(String name) throws ProtocolException {
        Object v = get(name);
        try {
            return new Activation(v, ActivationCodec.decode(v));
        } catch (ProtocolException e) {
            throw bad(name, e.detail);
        }
    }

    static boolean isNumber(Object v) {
        return v instanceof Long || v instanceof Double || v instanceof BigInteger
                || v instanceof Integer || v instanceof Float;
    }

    static int codePoints(String s) {
        return s.codePointCount(0, s.length());
    }
}
