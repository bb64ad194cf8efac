package org.spa.protocol;

import java.io.ByteArrayOutputStream;
import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * A test peer for tests/android/test_host.py: Python writes frames, Java answers with
 * frames, Python checks them. Files are sequences of (uint32 LE length, frame).
 *
 * <pre>
 * java ... org.spa.protocol.InteropTool encode IN OUT
 *     IN maps {"x": bin f32 LE, "rows", "cols", "scheme", "outliers"}; OUT maps {"encoded": activation map}
 *     (the Java encoder's output, for Python to decode and compare with its own encoder)
 * java ... org.spa.protocol.InteropTool messages IN OUT
 *     IN any message maps packed by Python; OUT each one parsed by Messages.parse and re-packed
 *     by toMap(), or {"type": "error", "code", "message"} when Java refuses it
 * java ... org.spa.protocol.InteropTool device IN OUT
 *     as messages, parsed as the device receives them: Messages.parse(map, Messages.DEVICE)
 * java ... org.spa.protocol.InteropTool prompts IN OUT
 *     IN maps {"text": str, "max_doc_tokens": int}; OUT maps {"document": Prompts.plainDocument(text, max_doc_tokens)}
 * </pre>
 */
public final class InteropTool {
    private InteropTool() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 3) {
            System.err.println("usage: InteropTool encode|messages|device|prompts IN OUT");
            System.exit(2);
        }
        Frames frames = new Frames();
        List<byte[]> out = new ArrayList<byte[]>();
        for (byte[] frame : readFrames(new File(args[1]))) {
            Map<String, Object> in;
            Map<String, Object> reply;
            try {
                in = frames.unpack(frame);
                if (args[0].equals("encode")) reply = encode(in);
                else if (args[0].equals("prompts")) reply = prompt(in);
                else reply = Messages.parse(in, args[0].equals("device") ? Messages.DEVICE : null).toMap();
            } catch (ProtocolException e) {
                reply = Messages.Error.of(e).toMap();
            }
            out.add(frames.pack(reply));
        }
        writeFrames(new File(args[2]), out);
    }

    private static Map<String, Object> encode(Map<String, Object> in) {
        int rows = ((Number) in.get("rows")).intValue(), cols = ((Number) in.get("cols")).intValue();
        ByteBuffer b = ByteBuffer.wrap((byte[]) in.get("x")).order(ByteOrder.LITTLE_ENDIAN);
        float[][] x = new float[rows][cols];
        for (int r = 0; r < rows; r++) for (int c = 0; c < cols; c++) x[r][c] = b.getFloat();
        Map<String, Object> reply = new LinkedHashMap<String, Object>();
        reply.put("encoded", ActivationCodec.encode(x, (String) in.get("scheme"), ((Number) in.get("outliers")).intValue()));
        return reply;
    }

    private static Map<String, Object> prompt(Map<String, Object> in) {
        Map<String, Object> reply = new LinkedHashMap<String, Object>();
        reply.put("document", Prompts.plainDocument((String) in.get("text"), ((Number) in.get("max_doc_tokens")).intValue()));
        return reply;
    }

    static List<byte[]> readFrames(File f) throws IOException {
        ByteBuffer b = ByteBuffer.wrap(Files2.readBytes(f)).order(ByteOrder.LITTLE_ENDIAN);
        List<byte[]> frames = new ArrayList<byte[]>();
        while (b.remaining() >= 4) {
            byte[] frame = new byte[b.getInt()];
            b.get(frame);
            frames.add(frame);
        }
        return frames;
    }

    static void writeFrames(File f, List<byte[]> frames) throws IOException {
        ByteArrayOutputStream out = new ByteArrayOutputStream();
        for (byte[] frame : frames) {
            out.write(ByteBuffer.allocate(4).order(ByteOrder.LITTLE_ENDIAN).putInt(frame.length).array());
            out.write(frame);
        }
        FileOutputStream fo = new FileOutputStream(f);
        try {
            fo.write(out.toByteArray());
        } finally {
            fo.close();
        }
    }
}
