package org.spa.protocol;

import java.io.File;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.channels.FileChannel;
import java.nio.charset.StandardCharsets;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Reads float32 tensors from a .safetensors file: an 8-byte little-endian
 * header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
 * raw little-endian data. Only F32 is loaded onto the heap (spa/model/plugin.py saves float32);
 * {@link #readHeader} parses any header for OutputHead, which memory-maps its data.
 */
public final class Safetensors {
    /** One tensor: its shape and its values, row-major. */
    public static final class Tensor {
        public final long[] shape;
        public final float[] data;

        Tensor(long[] shape, float[] data) {
            this.shape = shape;
            this.data = data;
        }
    }

    private Safetensors() {}

    /** The .safetensors bytes of float32 tensors (name -> shape, values), in the map's order. */
    public static byte[] write(Map<String, long[]> shapes, Map<String, float[]> values) {
        Map<String, Object> header = new LinkedHashMap<String, Object>();
        long offset = 0;
        for (Map.Entry<String, long[]> e : shapes.entrySet()) {
            Map<String, Object> info = new LinkedHashMap<String, Object>();
            info.put("dtype", "F32");
            List<Object> shape = new java.util.ArrayList<Object>();
            for (long d : e.getValue()) shape.add(d);
            info.put("shape", shape);
            long end = offset + 4L * values.get(e.getKey()).length;
            List<Object> offsets = new java.util.ArrayList<Object>();
            offsets.add(offset);
            offsets.add(end);
            info.put("data_offsets", offsets);
            header.put(e.getKey(), info);
            offset = end;
        }
        byte[] head;
        try {
            head = Json.write(header).getBytes("UTF-8");
        } catch (java.io.UnsupportedEncodingException e) {
            throw new IllegalStateException(e);
        }
        int pad = (8 - head.length % 8) % 8; // the data starts 8-byte aligned, as the Python writer pads
        ByteBuffer b = ByteBuffer.allocate(8 + head.length + pad + (int) offset).order(ByteOrder.LITTLE_ENDIAN);
        b.putLong(head.length + pad).put(head);
        for (int i = 0; i < pad; i++) b.put((byte) ' ');
        for (String name : shapes.keySet()) for (float v : values.get(name)) b.putFloat(v);
        return b.array();
    }

    public static Map<String, Tensor> load(File file) throws IOException {
        return parse(Files2.readBytes(file), file.getName());
    }

    public static Map<String, Tensor> parse(byte[] bytes, String what) throws IOException {
        if (bytes.length < 8) throw new IOException(what + ": too short for safetensors");
        ByteBuffer b = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN);
        long headerLen = b.getLong(0);
        if (headerLen < 2 || headerLen > bytes.length - 8) throw new IOException(what + ": bad safetensors header length");
        int dataStart = 8 + (int) headerLen;
        Header header = header(new String(bytes, 8, (int) headerLen, StandardCharsets.UTF_8), dataStart, bytes.length, what);
        Map<String, Tensor> out = new LinkedHashMap<String, Tensor>();
        for (Entry e : header.tensors.values()) {
            if (!"F32".equals(e.dtype)) throw new IOException(what + ": tensor " + e.name + " is " + e.dtype + ", expected F32");
            float[] data = new float[(int) e.numel];
            ByteBuffer t = ByteBuffer.wrap(bytes, (int) (dataStart + e.begin), (int) (e.end - e.begin)).order(ByteOrder.LITTLE_ENDIAN);
            for (int i = 0; i < data.length; i++) data[i] = t.getFloat();
            out.put(e.name, new Tensor(e.shape, data));
        }
        return out;
    }

    // --- the header alone (for files too large for the heap: OutputHead memory-maps their data) ---

    /** One tensor of a header: its dtype, shape, and its bytes [begin, end) counted from the data start. */
    static final class Entry {
        final String name;
        final String dtype;
        final long[] shape;
        final long numel;
        final long begin;
        final long end;

        Entry(String name, String dtype, long[] shape, long numel, long begin, long end) {
            this.name = name;
            this.dtype = dtype;
            this.shape = shape;
            this.numel = numel;
            this.begin = begin;
            this.end = end;
        }
    }

    /** A parsed header: where the data starts in the file, the tensors (in the header's order), __metadata__. */
    static final class Header {
        final long dataStart;
        final Map<String, Entry> tensors;
        final Map<String, String> metadata;

        Header(long dataStart, Map<String, Entry> tensors, Map<String, String> metadata) {
            this.dataStart = dataStart;
            this.tensors = tensors;
            this.metadata = metadata;
        }
    }

    /** Bytes per element of a safetensors dtype; 0 for one this module does not know. */
    static int elementSize(String dtype) {
        if (dtype.equals("F64") || dtype.equals("I64") || dtype.equals("U64")) return 8;
        if (dtype.equals("F32") || dtype.equals("I32") || dtype.equals("U32")) return 4;
        if (dtype.equals("F16") || dtype.equals("BF16") || dtype.equals("I16") || dtype.equals("U16")) return 2;
        if (dtype.equals("U8") || dtype.equals("I8") || dtype.equals("BOOL") || dtype.startsWith("F8_")) return 1;
        return 0;
    }

    /** Reads and checks the header of a safetensors file (the data itself is not read). */
    static Header readHeader(FileChannel channel, String what) throws IOException {
        long size = channel.size();
        if (size < 8) throw new IOException(what + ": too short for safetensors (" + size + " bytes)");
        ByteBuffer len = ByteBuffer.allocate(8).order(ByteOrder.LITTLE_ENDIAN);
        readFully(channel, len, 0, what);
        long headerLen = len.getLong(0);
        if (headerLen < 2 || headerLen > size - 8 || headerLen > 100L << 20) {
            throw new IOException(what + ": bad safetensors header length " + headerLen + " (file of " + size + " bytes)");
        }
        ByteBuffer text = ByteBuffer.allocate((int) headerLen);
        readFully(channel, text, 8, what);
        return header(new String(text.array(), StandardCharsets.UTF_8), 8 + headerLen, size, what);
    }

    private static void readFully(FileChannel channel, ByteBuffer into, long at, String what) throws IOException {
        while (into.hasRemaining()) {
            int n = channel.read(into, at + into.position());
            if (n < 0) throw new IOException(what + ": truncated safetensors header");
        }
    }

    /** Parses header JSON; every known dtype's byte count must match its shape, and all data must lie in the file. */
    static Header header(String json, long dataStart, long fileSize, String what) throws IOException {
        Map<String, Object> parsed;
        try {
            parsed = Json.parseObject(json.trim());
        } catch (IllegalArgumentException e) {
            throw new IOException(what + ": bad safetensors header: " + e.getMessage());
        }
        Map<String, Entry> tensors = new LinkedHashMap<String, Entry>();
        Map<String, String> metadata = new LinkedHashMap<String, String>();
        for (Map.Entry<String, Object> e : parsed.entrySet()) {
            String name = e.getKey();
            if (name.equals("__metadata__")) {
                if (!(e.getValue() instanceof Map)) throw new IOException(what + ": bad safetensors __metadata__");
                for (Map.Entry<?, ?> m : ((Map<?, ?>) e.getValue()).entrySet()) {
                    metadata.put(String.valueOf(m.getKey()), m.getValue() == null ? null : String.valueOf(m.getValue()));
                }
                continue;
            }
            try {
                Map<?, ?> info = (Map<?, ?>) e.getValue();
                String dtype = (String) info.get("dtype");
                List<?> shapeList = (List<?>) info.get("shape");
                List<?> offsets = (List<?>) info.get("data_offsets");
                if (dtype == null || shapeList == null || offsets == null || offsets.size() != 2) {
                    throw new IOException(what + ": tensor " + name + " lacks dtype, shape or data_offsets");
                }
                long[] shape = new long[shapeList.size()];
                long numel = 1;
                for (int i = 0; i < shape.length; i++) {
                    shape[i] = ((Number) shapeList.get(i)).longValue();
                    if (shape[i] < 0) throw new IOException(what + ": tensor " + name + " has a negative dimension");
                    numel *= shape[i];
                }
                long begin = ((Number) offsets.get(0)).longValue(), end = ((Number) offsets.get(1)).longValue();
                int size = elementSize(dtype);
                if (begin < 0 || end < begin || (size > 0 && end - begin != numel * size)) {
                    throw new IOException(what + ": tensor " + name + " has bad data offsets [" + begin + ", " + end
                            + "] for " + dtype + " " + Arrays.toString(shape));
                }
                if (dataStart + end > fileSize) {
                    throw new IOException(what + ": tensor " + name + " ends at byte " + (dataStart + end)
                            + " but the file has " + fileSize + " bytes (truncated)");
                }
                tensors.put(name, new Entry(name, dtype, shape, numel, begin, end));
            } catch (ClassCastException x) {
                throw new IOException(what + ": tensor " + name + " has a malformed header entry");
            }
        }
        return new Header(dataStart, tensors, metadata);
    }
}
