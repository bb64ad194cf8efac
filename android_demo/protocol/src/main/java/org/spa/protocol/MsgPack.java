package org.spa.protocol;

import java.io.EOFException;
import java.io.IOException;
import java.math.BigInteger;
import java.nio.ByteBuffer;
import java.nio.charset.CharacterCodingException;
import java.nio.charset.CodingErrorAction;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessageFormat;
import org.msgpack.core.MessageInsufficientBufferException;
import org.msgpack.core.MessageIntegerOverflowException;
import org.msgpack.core.MessageNeverUsedFormatException;
import org.msgpack.core.MessagePack;
import org.msgpack.core.MessagePackException;
import org.msgpack.core.MessageSizeException;
import org.msgpack.core.MessageUnpacker;

/**
 * msgpack <-> plain Java values, with the limits of the reference decoder.
 *
 * Values: null, Boolean, Long (every integer that fits; larger unsigned ones as
 * BigInteger), Double (float32 widens exactly), String, byte[] (bin), List, Map
 * with String keys. Extension types, non-str map keys, invalid UTF-8, trailing
 * bytes and over-long arrays, maps or nesting are all `bad_frame`. Every length
 * is checked against the bytes left before anything is allocated.
 */
public final class MsgPack {
    private MsgPack() {}

    // ------------------------------------------------------------------ pack

    public static byte[] pack(Object value) {
        MessageBufferPacker p = MessagePack.newDefaultBufferPacker();
        try {
            write(p, value);
            p.close();
        } catch (IOException e) { // a buffer packer does no I/O
            throw new IllegalStateException(e);
        }
        return p.toByteArray();
    }

    private static void write(MessageBufferPacker p, Object v) throws IOException {
        if (v == null) {
            p.packNil();
        } else if (v instanceof Boolean) {
            p.packBoolean((Boolean) v);
        } else if (v instanceof Long || v instanceof Integer || v instanceof Short || v instanceof Byte) {
            p.packLong(((Number) v).longValue());
        } else if (v instanceof BigInteger) {
            p.packBigInteger((BigInteger) v);
        } else if (v instanceof Double || v instanceof Float) {
            p.packDouble(((Number) v).doubleValue()); // float64, as Python's msgpack packs floats
        } else if (v instanceof String) {
            p.packString((String) v);
        } else if (v instanceof byte[]) {
            byte[] b = (byte[]) v;
            p.packBinaryHeader(b.length);
            p.writePayload(b);
        } else if (v instanceof List) {
            List<?> list = (List<?>) v;
            p.packArrayHeader(list.size());
            for (Object item : list) write(p, item);
        } else if (v instanceof Map) {
            Map<?, ?> map = (Map<?, ?>) v;
            p.packMapHeader(map.size());
            for (Map.Entry<?, ?> e : map.entrySet()) {
                if (!(e.getKey() instanceof String)) throw new IllegalArgumentException("map keys must be strings");
                p.packString((String) e.getKey());
                write(p, e.getValue());
            }
        } else {
            throw new IllegalArgumentException("cannot pack a " + v.getClass().getName());
        }
    }

    // ------------------------------------------------------------------ unpack

    /** The single value of `data`; anything malformed or over a limit is `bad_frame`. */
    public static Object unpack(byte[] data, int maxArrayLen, int maxMapLen, int maxDepth) throws ProtocolException {
        MessageUnpacker u = MessagePack.newDefaultUnpacker(data);
        try {
            Object value = new Reader(u, data.length, maxArrayLen, maxMapLen, maxDepth).read(0);
            if (u.hasNext()) throw badFrame("trailing bytes after the msgpack value");
            return value;
        } catch (MessagePackException e) { // truncation, bad format bytes
            throw badFrame("bad msgpack: " + reason(e));
        } catch (IOException e) {
            throw badFrame("bad msgpack: " + reason(e));
        } finally {
            try {
                u.close();
            } catch (IOException ignored) {
                // nothing to release for an array source
            }
        }
    }

    private static final class Reader {
        final MessageUnpacker u;
        final long size;
        final int maxArrayLen, maxMapLen, maxDepth;

        Reader(MessageUnpacker u, long size, int maxArrayLen, int maxMapLen, int maxDepth) {
            this.u = u;
            this.size = size;
            this.maxArrayLen = maxArrayLen;
            this.maxMapLen = maxMapLen;
            this.maxDepth = maxDepth;
        }

        long left() {
            return size - u.getTotalReadBytes();
        }

        Object read(int depth) throws IOException, ProtocolException {
            if (depth > maxDepth) throw badFrame("msgpack nesting deeper than " + maxDepth);
            if (!u.hasNext()) throw badFrame("truncated msgpack");
            MessageFormat format = u.getNextFormat();
            if (format == MessageFormat.NEVER_USED) throw badFrame("bad msgpack: " + NEVER_USED);
            switch (format.getValueType()) {
                case NIL:
                    u.unpackNil();
                    return null;
                case BOOLEAN:
                    return u.unpackBoolean();
                case INTEGER:
                    if (format == MessageFormat.UINT64) {
                        BigInteger b = u.unpackBigInteger();
                        return b.bitLength() < 64 ? (Object) b.longValue() : b;
                    }
                    return u.unpackLong();
                case FLOAT:
                    return u.unpackDouble();
                case STRING: {
                    int n = length(u.unpackRawStringHeader());
                    try {
                        return StandardCharsets.UTF_8.newDecoder()
                                .onMalformedInput(CodingErrorAction.REPORT)
                                .onUnmappableCharacter(CodingErrorAction.REPORT)
                                .decode(ByteBuffer.wrap(u.readPayload(n)))
                                .toString();
                    } catch (CharacterCodingException e) {
                        throw badFrame("a msgpack str is not valid UTF-8");
                    }
                }
                case BINARY:
                    return u.readPayload(length(u.unpackBinaryHeader()));
                case ARRAY: {
                    int n = u.unpackArrayHeader();
                    if (n < 0 || n > maxArrayLen || n > left()) throw badFrame("msgpack array of " + n + " items");
                    List<Object> list = new ArrayList<Object>(n);
                    for (int i = 0; i < n; i++) list.add(read(depth + 1));
                    return list;
                }
                case MAP: {
                    int n = u.unpackMapHeader();
                    if (n < 0 || n > maxMapLen || 2L * n > left()) throw badFrame("msgpack map of " + n + " keys");
                    Map<String, Object> map = new LinkedHashMap<String, Object>();
                    for (int i = 0; i < n; i++) {
                        if (!u.hasNext() || u.getNextFormat().getValueType() != org.msgpack.value.ValueType.STRING) {
                            throw badFrame("msgpack map keys must be str");
                        }
                        String key = (String) read(depth + 1);
                        map.put(key, read(depth + 1));
                    }
                    return map;
                }
                default: // EXTENSION
                    throw badFrame("msgpack " + format + " is not allowed");
            }
        }

        /** A str/bin length, refused unless that many bytes are left (a header may lie). */
        int length(int n) throws ProtocolException {
            if (n < 0 || n > left()) throw badFrame("msgpack str/bin of " + (n & 0xffffffffL) + " bytes overruns the frame");
            return n;
        }
    }

    static final String NEVER_USED = "a byte that starts no msgpack value (e.g. 0xc1, which msgpack never uses)";

    /** A readable reason for a msgpack error: some (a truncated value, a size) carry no text. */
    static String reason(Exception e) {
        String m = e.getMessage();
        if (m != null && !m.trim().isEmpty()) return m;
        if (e instanceof MessageInsufficientBufferException || e instanceof EOFException) {
            return "the frame ends inside a msgpack value (truncated)";
        }
        if (e instanceof MessageNeverUsedFormatException) return NEVER_USED;
        if (e instanceof MessageSizeException) return "a msgpack length beyond what this decoder holds";
        if (e instanceof MessageIntegerOverflowException) return "a msgpack integer beyond 64 bits";
        return e.getClass().getSimpleName();
    }

    private static ProtocolException badFrame(String message) {
        return new ProtocolException("bad_frame", message);
    }
}
