package org.spa.protocol;

import java.io.File;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * Reads float32 tensors from a .safetensors file: an 8-byte little-endian
 * header length, a JSON header {name: {dtype, shape, data_offsets}}, then the
 * raw little-endian data. Only F32 is needed (spa/model/plugin.py saves float32).
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
        Map<String, Object> header;
        try {
            header = Json.parseObject(new String(bytes, 8, (int) headerLen, "UTF-8"));
        } catch (IllegalArgumentException e) {
            throw new IOException(what + ": bad safetensors header: " + e.getMessage());
        }
        Map<String, Tensor> out = new LinkedHashMap<String, Tensor>();
        for (Map.Entry<String, Object> e : header.entrySet()) {
            if (e.getKey().equals("__metadata__")) continue;
            Map<?, ?> info = (Map<?, ?>) e.getValue();
            if (!"F32".equals(info.get("dtype"))) {
                throw new IOException(what + ": tensor " + e.getKey() + " is " + info.get("dtype") + ", expected F32");
            }
            List<?> shapeList = (List<?>) info.get("shape");
            long[] shape = new long[shapeList.size()];
            long numel = 1;
            for (int i = 0; i < shape.length; i++) {
                shape[i] = ((Number) shapeList.get(i)).longValue();
                numel *= shape[i];
            }
            List<?> offsets = (List<?>) info.get("data_offsets");
            long begin = ((Number) offsets.get(0)).longValue(), end = ((Number) offsets.get(1)).longValue();
            if (end - begin != numel * 4 || begin < 0 || dataStart + end > bytes.length) {
                throw new IOException(what + ": tensor " + e.getKey() + " has bad data offsets");
            }
            float[] data = new float[(int) numel];
            ByteBuffer t = ByteBuffer.wrap(bytes, dataStart + (int) begin, (int) (end - begin)).order(ByteOrder.LITTLE_ENDIAN);
            for (int i = 0; i < data.length; i++) data[i] = t.getFloat();
            out.put(e.getKey(), new Tensor(shape, data));
        }
        return out;
    }
}
