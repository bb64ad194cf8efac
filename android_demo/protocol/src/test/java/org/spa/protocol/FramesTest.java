package org.spa.protocol;

import static org.junit.Assert.assertArrayEquals;
import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertTrue;
import static org.junit.Assert.fail;

import java.io.ByteArrayOutputStream;
import java.lang.management.ManagementFactory;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.LinkedHashMap;
import java.util.Map;
import java.util.Random;

import org.junit.Test;
import org.msgpack.core.MessageBufferPacker;
import org.msgpack.core.MessagePack;

import com.github.luben.zstd.ZstdCompressCtx;

/** Frames: round trip, zstd bombs, size limits and malformed input (mirrors tests/protocol/test_state_machines.py). */
public class FramesTest {
    static String codeOf(Frames frames, byte[] data) {
        try {
            frames.unpack(data);
        } catch (ProtocolException e) {
            return e.code;
        }
        fail("frame accepted");
        return null;
    }

    static byte[] zstd(byte[] payload, boolean contentSize) {
        ZstdCompressCtx c = new ZstdCompressCtx();
        c.setLevel(3);
        c.setContentSize(contentSize);
        byte[] out = c.compress(payload);
        c.close();
        return out;
    }

    static byte[] msgpack(Packing body) throws Exception {
        MessageBufferPacker p = MessagePack.newDefaultBufferPacker();
        body.pack(p);
        p.close();
        return p.toByteArray();
    }

    interface Packing {
        void pack(MessageBufferPacker p) throws Exception;
    }

    /** A frame header claiming `claimed` bytes (8-byte size field), then RLE blocks of blockLen zeros. */
    static byte[] rleFrame(long claimed, int blockLen, int blocks) {
        ByteBuffer b = ByteBuffer.allocate(13 + 4 * blocks).order(ByteOrder.LITTLE_ENDIAN);
        b.putInt(ZstdFrameHeader.MAGIC);
        b.put((byte) 0xE0); // FCS 8 bytes, single segment, no checksum, no dictionary
        b.putLong(claimed);
        for (int i = 0; i < blocks; i++) {
            int header = (i == blocks - 1 ? 1 : 0) | (1 << 1) | (blockLen << 3); // RLE block
            b.put((byte) header).put((byte) (header >>> 8)).put((byte) (header >>> 16)).put((byte) 0);
        }
        return b.array();
    }

    @Test
    public void roundTripsAMap() throws Exception {
        Frames f = new Frames();
        Map<String, Object> msg = new LinkedHashMap<String, Object>();
        msg.put("type", "x");
        msg.put("b", new byte[] {0, (byte) 0xff, 7});
        msg.put("s", "h\u00e9llo \ud83d\ude00");
        msg.put("n", TestData.list(1L, -2L, 3.5, null, true, Long.MAX_VALUE, Long.MIN_VALUE));
        Map<String, Object> inner = new LinkedHashMap<String, Object>();
        inner.put("k", 1L);
        msg.put("m", inner);
        byte[] data = f.pack(msg);
        assertTrue(ZstdFrameHeader.parse(data).contentSize > 0); // stated, as the spec requires
        assertTrue(TestData.deepEquals(msg, f.unpack(data)));
        assertTrue(TestData.deepEquals(msg, new Frames().unpack(data))); // frames are independent
    }

    private static long allocatedBytes() {
        return ((com.sun.management.ThreadMXBean) ManagementFactory.getThreadMXBean()).getCurrentThreadAllocatedBytes();
    }

    @Test
    public void refusesZstdBombsBeforeAllocating() {
        Frames f = new Frames(Limits.MAX_FRAME_BYTES, 1 << 20, 3);
        byte[] bomb = rleFrame(64L << 20, 128 * 1024, 512); // a genuine frame: 64 MiB of zeros in 2 KB
        byte[] tera = rleFrame(1L << 40, 128 * 1024, 1); // header claims 1 TiB
        long before = allocatedBytes();
        assertEquals("too_large", codeOf(f, bomb));
        assertEquals("too_large", codeOf(f, tera));
        assertTrue("allocated " + (allocatedBytes() - before), allocatedBytes() - before < (2 << 20));
        assertEquals("bad_frame", codeOf(f, rleFrame(1000, 128 * 1024, 1))); // claims little, holds more
    }

    @Test
    public void refusesFramesWithoutContentSize() throws Exception {
        byte[] bye = msgpack(p -> p.packMapHeader(1).packString("type").packString("bye"));
        assertEquals("bad_frame", codeOf(new Frames(), zstd(bye, false)));
        assertEquals("bye", new Frames().unpack(zstd(bye, true)).get("type"));
    }

    @Test
    public void refusesMalformedFrames() throws Exception {
        Frames f = new Frames();
        Map<String, Object> byeMap = new LinkedHashMap<String, Object>();
        byeMap.put("type", "bye");
        byte[] bye = f.pack(byeMap);
        ByteArrayOutputStream two = new ByteArrayOutputStream();
        two.write(bye);
        two.write(bye);
        byte[][] bad = {
            new byte[0],
            "not zstd at all".getBytes("UTF-8"),
            java.util.Arrays.copyOf(bye, bye.length - 2), // truncated
            two.toByteArray(), // two frames
            zstd(msgpack(p -> p.packArrayHeader(2).packInt(1).packInt(2)), true), // not a map
            zstd(msgpack(p -> p.packMapHeader(1).packInt(1).packInt(2)), true), // int key
            zstd(concat(msgpack(p -> p.packMapHeader(1).packString("a").packInt(1)), new byte[] {0}), true), // trailing
            zstd(new byte[] {(byte) 0xdd, (byte) 0xff, (byte) 0xff, (byte) 0xff, (byte) 0xff}, true), // 4G-item array
            zstd(deepNesting(5000), true), // nesting too deep
            zstd(new byte[] {(byte) 0xd6, (byte) 0xff, 0, 0, 0, 1}, true), // ext type (a timestamp)
            zstd(new byte[] {(byte) 0x81, (byte) 0xa1, 0x61, (byte) 0xc1}, true), // never-used byte 0xc1
            zstd(new byte[] {(byte) 0x81, (byte) 0xa1, (byte) 0xff, (byte) 0xc0}, true), // invalid UTF-8 key
            zstd(new byte[] {(byte) 0x81, (byte) 0xa1, 0x61, (byte) 0xdb, 0x7f, (byte) 0xff, (byte) 0xff, (byte) 0xff}, true), // str header overruns
            skippable(),
        };
        for (int i = 0; i < bad.length; i++) assertEquals("case " + i, "bad_frame", codeOf(f, bad[i]));
    }

    @Test
    public void refusesOversizedFrames() {
        Frames f = new Frames(1000, 5000, 3);
        byte[] random = new byte[2000];
        new Random(0).nextBytes(random);
        Map<String, Object> m = new LinkedHashMap<String, Object>();
        m.put("b", random);
        assertEquals("too_large", codeOf(f, f.pack(m)));
        m.put("b", new byte[6000]); // compresses to little, but too big inside
        assertEquals("too_large", codeOf(f, f.pack(m)));
    }

    @Test
    public void randomBytesOnlyRaiseProtocolErrors() {
        Random rng = new Random(42);
        Frames f = new Frames();
        for (int i = 0; i < 2000; i++) {
            byte[] data = new byte[rng.nextInt(300)];
            rng.nextBytes(data);
            for (byte[] frame : new byte[][] {data, zstd(data, true)}) {
                try {
                    f.unpack(frame);
                } catch (ProtocolException e) {
                    assertTrue(ErrorCodes.isKnown(e.code));
                }
            }
        }
    }

    @Test
    public void packsBinAsBinAndIntegersCompactly() throws Exception {
        Map<String, Object> m = new LinkedHashMap<String, Object>();
        m.put("b", new byte[] {1});
        byte[] raw = MsgPack.pack(m);
        assertArrayEquals(new byte[] {(byte) 0x81, (byte) 0xa1, 'b', (byte) 0xc4, 1, 1}, raw);
    }

    private static byte[] concat(byte[] a, byte[] b) {
        byte[] c = java.util.Arrays.copyOf(a, a.length + b.length);
        System.arraycopy(b, 0, c, a.length, b.length);
        return c;
    }

    private static byte[] deepNesting(int depth) {
        byte[] b = new byte[depth + 1];
        java.util.Arrays.fill(b, (byte) 0x91); // fixarray of one element
        b[depth] = (byte) 0xc0;
        return b;
    }

    private static byte[] skippable() {
        ByteBuffer b = ByteBuffer.allocate(12).order(ByteOrder.LITTLE_ENDIAN);
        b.putInt(0x184D2A50).putInt(4).putInt(0);
        return b.array();
    }
}
