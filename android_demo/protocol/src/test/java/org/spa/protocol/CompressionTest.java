package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.junit.Test;

/** Frame compression negotiated in the handshake (docs/PROTOCOL.md section 2): zstd or none. */
public class CompressionTest {
    private static Map<String, Object> accept() {
        Map<String, Object> m = new LinkedHashMap<String, Object>();
        m.put("type", "accept");
        m.put("epoch", 0L);
        m.put("upto", 7L);
        return m;
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> rt(Map<String, Object> m) throws ProtocolException {
        return (Map<String, Object>) MsgPack.unpack(MsgPack.pack(m), Limits.MAX_ARRAY_LEN, Limits.MAX_MAP_LEN, Limits.MAX_DEPTH);
    }

    private static Frames frames(String compression, String write) {
        return new Frames(Limits.MAX_FRAME_BYTES, Limits.MAX_MESSAGE_BYTES, 3, compression, write);
    }

    @Test
    public void bothFormsAreToldApartByTheirFirstBytes() throws Exception {
        byte[] zstd = new Frames().pack(accept());
        byte[] raw = frames(Frames.NONE, null).pack(accept());
        assertArrayEquals(MsgPack.pack(accept()), raw);
        assertTrue(Frames.isZstd(zstd));
        Frames either = frames(null, Frames.NONE);
        assertEquals(accept(), either.unpack(raw));
        assertEquals(accept(), either.unpack(zstd));
        assertEquals(Frames.NONE, either.writes());
        assertEquals(accept(), frames(Frames.NONE, null).unpack(raw));
    }

    @Test
    public void afterTheChoiceTheOtherFormIsRefused() throws Exception {
        byte[] zstd = new Frames().pack(accept());
        byte[] raw = frames(Frames.NONE, null).pack(accept());
        Frames f = frames(null, Frames.ZSTD);
        f.negotiated(Frames.NONE);
        try {
            f.unpack(zstd);
            fail("zstd frame accepted on an uncompressed connection");
        } catch (ProtocolException e) {
            assertEquals("bad_frame", e.code);
        }
        try {
            new Frames().unpack(raw);
            fail("uncompressed frame accepted on a zstd connection");
        } catch (ProtocolException e) {
            assertEquals("bad_frame", e.code);
        }
        try {
            f.negotiated("brotli");
            fail("unknown compression accepted");
        } catch (ProtocolException e) {
            assertEquals("bad_field", e.code);
        }
    }

    @Test
    public void theOfferIsWhatLoadsAndNoneIsAlwaysThere() {
        List<String> offer = Frames.offer();
        assertEquals(Frames.NONE, offer.get(offer.size() - 1));
        assertEquals(Frames.zstdAvailable(), offer.contains(Frames.ZSTD));
    }

    @Test
    public void helloCarriesTheOfferAndReadyTheChoice() throws Exception {
        Messages.Plugin plugin = new Messages.Plugin("fp", new int[] {0, 2}, "h");
        Messages.Hello hello = new Messages.Hello("", plugin, "p", new Messages.Options(), null, null, null,
                Arrays.asList(Frames.NONE, Frames.ZSTD));
        Map<String, Object> map = hello.toMap();
        assertEquals(Arrays.asList(Frames.NONE, Frames.ZSTD), map.get("compression"));
        Messages.Hello back = (Messages.Hello) Messages.parse(rt(map));
        assertEquals(Arrays.asList(Frames.NONE, Frames.ZSTD), back.compression);
        assertNull(((Messages.Hello) Messages.parse(rt(
                new Messages.Hello("", plugin, "p", new Messages.Options()).toMap()))).compression);
        map.put("compression", Arrays.asList());
        try {
            Messages.parse(rt(map));
            fail("empty offer accepted");
        } catch (ProtocolException e) {
            assertEquals("bad_field", e.code);
        }
    }
}
