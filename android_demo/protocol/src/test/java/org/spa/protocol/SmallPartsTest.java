package org.spa.protocol;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;

import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Map;

import org.junit.Test;

/** Incremental UTF-8, prompts, JSON. */
public class SmallPartsTest {
    @Test
    public void utf8StreamHoldsBackSplitCharacters() {
        byte[] e = "\u00e9".getBytes(StandardCharsets.UTF_8); // 2 bytes
        byte[] smile = "\ud83d\ude00".getBytes(StandardCharsets.UTF_8); // 4 bytes
        Utf8Stream s = new Utf8Stream();
        assertEquals("a", s.append(new byte[] {'a', e[0]}));
        assertEquals("\u00e9b", s.append(new byte[] {e[1], 'b'}));
        assertEquals("", s.append(new byte[] {smile[0], smile[1]}));
        assertEquals("", s.append(new byte[] {smile[2]}));
        assertEquals("\ud83d\ude00", s.append(new byte[] {smile[3]}));
        assertEquals("", s.append(new byte[] {smile[0]}));
        assertEquals("\ufffd", s.finish()); // a dangling partial character
        assertEquals("\ufffdx", new Utf8Stream().append(new byte[] {(byte) 0xff, 'x'})); // invalid: replaced at once
    }

    @Test
    public void plainDocumentCollapsesSpaceAndCutsAtAWord() {
        assertEquals("a b c", Prompts.plainDocument("  a \n b\t\tc ", 10));
        String doc = Prompts.plainDocument("word1 word2 word3 word4", 3); // limit 12 characters
        assertEquals("word1 word2", doc);
        assertEquals("abcdefgh", Prompts.plainDocument("abcdefghijkl", 2)); // no space: hard cut
        assertEquals("X {document} Y\n\nI", Prompts.format("{document}\n\n{instruction}", "X {document} Y", "I"));
    }

    @Test
    @SuppressWarnings("unchecked")
    public void jsonRoundTrips() {
        Map<String, Object> m = Json.parseObject("{\"a\": [1, -2.5e3, true, null, \"x\\u00e9\\n\"], \"b\": {}, \"c\": 12345678901234}");
        List<Object> a = (List<Object>) m.get("a");
        assertEquals(1L, a.get(0));
        assertEquals(-2500.0, a.get(1));
        assertEquals("x\u00e9\n", a.get(4));
        assertEquals(12345678901234L, m.get("c"));
        String out = Json.write(m);
        assertTrue(out, out.contains("\"x\\u00e9\\n\""));
        assertEquals(m.toString(), Json.parseObject(out).toString());
    }
}
