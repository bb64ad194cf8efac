package org.spa.protocol;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.LinkedHashMap;
import java.util.Map;

import org.junit.Test;

/**
 * Where a review found the Java module differing from docs/PROTOCOL.md (sections 3 and 4, "The
 * prompt") and from the Python reference: the `type` field, the direction of a message, readable
 * error texts, and the whitespace of a plain document.
 */
public class SpecAgreementTest {
    static Map<String, Object> map(Object... kv) {
        return TestData.with(new LinkedHashMap<String, Object>(), kv);
    }

    static String repeat(char c, int n) {
        return new String(new char[n]).replace('\0', c);
    }

    static ProtocolException refused(Map<String, Object> d, String receiver) {
        try {
            Messages.parse(d, receiver);
        } catch (ProtocolException e) {
            return e;
        }
        fail("accepted " + d);
        return null;
    }

    // 1. no length limit on `type`: a missing or non-str type is bad_field, any unknown str unknown_type

    @Test
    @SuppressWarnings("unchecked")
    public void typeHasNoLengthLimit() {
        ProtocolException e = refused(map("type", repeat('x', 33)), null);
        assertEquals("unknown_type", e.code);
        assertEquals("unknown message type '" + repeat('x', 33) + "'", e.detail);

        e = refused(map("type", repeat('y', 1 << 20)), Messages.DEVICE); // a megabyte of name: shortened
        assertEquals("unknown_type", e.code);
        assertEquals("unknown message type '" + repeat('y', 64) + "'... (1048576 characters)", e.detail);

        e = refused(map("type", "\ud83d\ude00" + repeat('z', 70)), null); // cut at 64 code points, not UTF-16 units
        assertEquals("unknown message type '\ud83d\ude00" + repeat('z', 63) + "'... (71 characters)", e.detail);

        e = refused(map("type", "it's\n"), null); // as Python's repr writes it
        assertEquals("unknown message type \"it's\\n\"", e.detail);

        for (Map<String, Object> d : new Map[] {map("epoch", 0L), map("type", 5L), map("type", null),
                map("type", new byte[] {'s', 't', 'e', 'p'})}) {
            e = refused(d, Messages.DEVICE);
            assertEquals("bad_field", e.code);
            assertEquals(e.detail, "message.type", e.detail.substring(0, e.detail.indexOf(':')));
        }
        assertEquals("message.type: expected a str", refused(map("type", 5L), null).detail);
    }

    // 2. direction: a type the device never receives is unknown_type, from `type` alone

    @Test
    public void theDeviceRefusesGatewayBoundTypesBeforeReadingFields() throws Exception {
        for (String kind : new String[] {"hello", "accept", "need_taps", "side", "bye"}) {
            ProtocolException e = refused(map("type", kind), Messages.DEVICE); // incomplete: no field is read
            assertEquals(kind, "unknown_type", e.code);
            assertEquals("the device does not receive '" + kind + "'", e.detail);
        }
        // a complete, valid side is refused all the same; parse(d) (both directions) accepts it
        Map<String, Object> side = MessagesTest.examples().get(7).toMap();
        assertEquals("side", side.get("type"));
        assertEquals("unknown_type", refused(side, Messages.DEVICE).code);
        assertEquals("side", Messages.parse(side).type());
        // the other way round: an incomplete step sent to the gateway is unknown_type, not bad_field
        assertEquals("unknown_type", refused(map("type", "step"), Messages.GATEWAY).code);
        assertEquals("the gateway does not receive 'step'", refused(map("type", "step"), Messages.GATEWAY).detail);
        // types the device receives are read as usual (fields checked)
        assertEquals("bad_field", refused(map("type", "step"), Messages.DEVICE).code);
        assertEquals("bad_field", refused(map("type", "error"), Messages.DEVICE).code);
        for (Messages.Message m : MessagesTest.examples()) {
            boolean toDevice = !(m instanceof Messages.Hello || m instanceof Messages.Accept
                    || m instanceof Messages.NeedTaps || m instanceof Messages.Side || m instanceof Messages.Bye);
            if (toDevice) assertEquals(m.type(), Messages.parse(m.toMap(), Messages.DEVICE).type());
            else assertEquals(m.type(), "unknown_type", refused(m.toMap(), Messages.DEVICE).code);
        }
        // the session itself parses as the device: an incomplete need_taps is unknown_type, not bad_field
        Messages.Hello hello = (Messages.Hello) MessagesTest.examples().get(0);
        try {
            new DeviceSession(hello).receive(map("type", "need_taps"));
            fail("the device accepted a need_taps");
        } catch (ProtocolException e) {
            assertEquals("unknown_type", e.code);
            assertEquals("the device does not receive 'need_taps'", e.detail);
        }
    }

    // 3. readable error texts

    @Test
    public void errorTextsAreReadable() throws Exception {
        Map<String, Object> hello = MessagesTest.examples().get(0).toMap();
        ProtocolException e = refused(TestData.with(hello, "prompt", 7L), null); // the prompt has no limit
        assertEquals("hello.prompt: expected a str", e.detail);
        e = refused(TestData.with(hello, "token", repeat('t', 257)), null);
        assertEquals("hello.token: expected a str of at most 256 characters", e.detail);
        @SuppressWarnings("unchecked")
        Map<String, Object> options = (Map<String, Object>) hello.get("options");
        e = refused(TestData.with(hello, "options", TestData.with(options, "temperature", -0.5)), null);
        assertEquals("hello.options.temperature: expected a finite number >= 0", e.detail);
        e = refused(TestData.with(hello, "options", TestData.with(options, "temperature", Double.NaN)), null);
        assertEquals("hello.options.temperature: expected a finite number >= 0", e.detail);
        assertEquals("0", Fields.shown(0.0));
        assertEquals("0.5", Fields.shown(0.5));
        try {
            new Fields(map("x", Double.POSITIVE_INFINITY), "m").number("x", Double.NEGATIVE_INFINITY);
            fail("accepted inf");
        } catch (ProtocolException x) {
            assertEquals("m.x: expected a finite number", x.detail); // not ">= -Infinity"
        }
        // msgpack errors: a real reason, never "null"
        byte[][] bad = {
            {(byte) 0x81, (byte) 0xa1, 'a', (byte) 0xcd, 1}, // uint16 with one byte
            {(byte) 0x81, (byte) 0xa1, 'a', (byte) 0xcb, 0, 0}, // float64 with two bytes
            {(byte) 0xc1}, // the never-used byte
            {(byte) 0x81, (byte) 0xa1, 'a', (byte) 0xc1},
        };
        for (byte[] b : bad) {
            try {
                MsgPack.unpack(b, 1000, 1000, 16);
                fail("accepted " + TestData.toHex(b));
            } catch (ProtocolException x) {
                assertEquals("bad_frame", x.code);
                assertFalse(x.detail, x.detail.contains("null"));
                assertTrue(x.detail, x.detail.startsWith("bad msgpack: ") || x.detail.startsWith("truncated"));
                assertTrue(x.detail, x.detail.length() > "bad msgpack: ".length() + 5);
            }
        }
        assertEquals("the frame ends inside a msgpack value (truncated)",
                MsgPack.reason(new org.msgpack.core.MessageInsufficientBufferException()));
        assertEquals("a byte that starts no msgpack value (e.g. 0xc1, which msgpack never uses)",
                MsgPack.reason(new org.msgpack.core.MessageNeverUsedFormatException("")));
        assertEquals("some text", MsgPack.reason(new java.io.IOException("some text")));
        assertEquals("IllegalStateException", MsgPack.reason(new IllegalStateException()));
    }

    // 4. the document's whitespace is Python's str.split()

    @Test
    public void plainDocumentSplitsOnPythonWhitespace() {
        String[] spaces = {"\u0009", "\n", "\u000b", "\u000c", "\r", "\u001c", "\u001d", "\u001e", "\u001f", " ",
            "\u0085", "\u00a0", "\u1680", "\u2000", "\u2005", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f",
            "\u3000"};
        for (String s : spaces) {
            assertEquals(Integer.toHexString(s.charAt(0)), "a b", Prompts.plainDocument(s + "a" + s + s + "b" + s, 10));
            assertTrue(Prompts.isSpace(s.charAt(0)));
        }
        // not whitespace for Python: kept inside words, and at the ends
        String[] words = {"\u200b", "\u2060", "\ufeff", "\u180e", "\u0000", "\u0001", "\u001b", "\u007f", "\u0084",
            "\u0086", "\u009f", "\u200c"};
        for (String s : words) {
            assertEquals(Integer.toHexString(s.charAt(0)), s + "a" + s + " b" + s, Prompts.plainDocument(s + "a" + s + " b" + s, 10));
            assertFalse(Prompts.isSpace(s.charAt(0)));
        }
        // trim() dropped control characters at the ends; str.split() keeps them
        assertEquals("\u0001x\u0002", Prompts.plainDocument(" \u0001x\u0002\n", 10));
        // the cut counts code points and ends at a word boundary (a no-break space is a boundary)
        assertEquals("\ud83d\ude00\ud83d\ude00 b", Prompts.plainDocument("\ud83d\ude00\ud83d\ude00\u00a0b\u3000cdefgh", 2));
        assertEquals("", Prompts.plainDocument("\u2028\u3000 \u0085", 10));
    }
}
