package org.spa.protocol;

import static org.junit.Assert.assertTrue;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import org.junit.Test;

/**
 * The shared message vectors (tests/vectors/message_vectors.json, generated from
 * spa/protocol/schema.json; the Python suite runs the same file): every map is accepted as its
 * message type, or refused with the expected code and an error text that starts with the path.
 */
public class MessageVectorsTest {
    @Test
    @SuppressWarnings("unchecked")
    public void everyVectorParsesAsTheSchemaSays() throws Exception {
        List<Object> cases = (List<Object>) TestData.json("message_vectors.json").get("cases");
        assertTrue(cases.size() > 250);
        List<String> wrong = new ArrayList<String>();
        for (Object o : cases) {
            Map<String, Object> c = (Map<String, Object>) o;
            Map<String, Object> expect = (Map<String, Object>) c.get("expect");
            byte[] data = TestData.hex((String) c.get("msgpack"));
            String got;
            boolean ok;
            try {
                Map<String, Object> d = (Map<String, Object>) MsgPack.unpack(data, 4096, 256, 32);
                Messages.Message msg = Messages.parse(d, (String) c.get("receiver"));
                got = "type " + msg.type();
                ok = msg.type().equals(expect.get("type"));
            } catch (ProtocolException e) {
                got = e.code + ": " + e.detail;
                ok = e.code.equals(expect.get("code")) && e.detail.startsWith((String) expect.get("path"));
            }
            if (!ok) wrong.add(c.get("name") + ": expected " + expect + ", got " + got);
        }
        assertTrue(wrong.size() + " of " + cases.size() + " vectors disagree:\n" + join(wrong), wrong.isEmpty());
    }

    private static String join(List<String> lines) {
        StringBuilder b = new StringBuilder();
        for (String s : lines) b.append(s).append('\n');
        return b.toString();
    }
}
