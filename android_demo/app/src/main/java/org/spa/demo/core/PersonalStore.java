package org.spa.demo.core;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.spa.protocol.Files2;
import org.spa.protocol.Json;
import org.spa.protocol.PluginConfig;
import org.spa.protocol.Safetensors;

/**
 * The plugin the phone learned, kept atomically: the layout of spa/model/personal.py's store,
 * written by the app.
 *
 * <pre>
 *   plugin-train.pte, plugin-train.json   the training program (copied once from the imported export)
 *   CURRENT                                names the current version ("v000003")
 *   v000003/plugin-train.ptd               its weights; plugin-train.ptd.sha256 their digest
 *           plugin.safetensors, config.json the same plugin as HostPluginExecutor loads it
 * </pre>
 *
 * A write fills a fresh temporary directory, syncs it, renames it to the next version, and
 * replaces CURRENT by renaming a synced temporary file over it: a crash at any moment leaves
 * CURRENT naming a complete version (the previous plugin). Debris of an interrupted write is
 * removed by the next one. The content hash of a version the app writes is its own (the
 * SHA-256 of the weights file, 16 hex digits): the Python writer's hash covers its JSON
 * spelling of the config, which Java does not reproduce; the hash is informational on the wire.
 */
public final class PersonalStore {
    public static final String PTE = "plugin-train.pte", PTD = "plugin-train.ptd", JSON = "plugin-train.json",
            CURRENT = "CURRENT", DIGEST = PTD + ".sha256", CONFIG = "config.json", WEIGHTS = "plugin.safetensors";

    public final File root;
    private final Map<String, Object> layout; // name -> {offset, bytes, shape}
    private final List<String> names; // the plugin's state-dict names

    public PersonalStore(File root) throws IOException {
        this.root = root;
        if (!new File(root, CURRENT).isFile()) throw new IOException(root + " is not a personal plugin store");
        Map<String, Object> info = Json.parseObject(Files2.readUtf8(new File(root, JSON)));
        layout = asMap(info.get("layout"));
        names = new ArrayList<String>();
        for (Object n : (List<?>) info.get("weights")) names.add((String) n);
    }

    /** A store whose first version is an export's plugin (the files `spa export` writes). */
    public static PersonalStore create(File export, File root) throws IOException {
        for (String n : new String[] {PTE, PTD, JSON, CONFIG, WEIGHTS}) {
            if (!new File(export, n).isFile()) throw new IOException(export + " has no " + n + ": export it again");
        }
        if (!root.isDirectory() && !root.mkdirs()) throw new IOException("cannot create " + root);
        for (String n : new String[] {PTE, JSON}) write(new File(root, n), Files2.readBytes(new File(export, n)));
        write(new File(root, CURRENT + ".tmp"), "none\n".getBytes("UTF-8"));
        rename(new File(root, CURRENT + ".tmp"), new File(root, CURRENT));
        PersonalStore store = new PersonalStore(root);
        store.commit(Files2.readBytes(new File(export, PTD)), Files2.readUtf8(new File(export, CONFIG)),
                Files2.readBytes(new File(export, WEIGHTS)));
        return store;
    }

    public File pte() {
        return new File(root, PTE);
    }

    /** The current version's directory (what HostPluginExecutor.load and the training program read). */
    public File current() throws IOException {
        String name = Files2.readUtf8(new File(root, CURRENT)).trim();
        File dir = new File(root, name);
        if (!name.startsWith("v") || !dir.isDirectory()) throw new IOException(root + "/CURRENT names no version: " + name);
        return dir;
    }

    public PluginConfig config() throws IOException {
        return PluginConfig.load(new File(current(), CONFIG));
    }

    /** The current weights file, checked against its digest. */
    public byte[] weightsFile() throws IOException {
        File dir = current();
        byte[] data = Files2.readBytes(new File(dir, PTD));
        String want = Files2.readUtf8(new File(dir, DIGEST)).trim();
        if (!sha256(data).equals(want)) throw new IOException(dir + "/" + PTD + " is corrupt (digest mismatch)");
        return data;
    }

    /** The current weights by state-dict name (float32). */
    public Map<String, float[]> weights() throws IOException {
        byte[] ptd = weightsFile();
        Map<String, float[]> out = new LinkedHashMap<String, float[]>();
        for (String n : names) {
            Map<String, Object> at = asMap(layout.get(n));
            int offset = ((Number) at.get("offset")).intValue(), bytes = ((Number) at.get("bytes")).intValue();
            float[] w = new float[bytes / 4];
            ByteBuffer b = ByteBuffer.wrap(ptd, offset, bytes).order(ByteOrder.LITTLE_ENDIAN);
            for (int i = 0; i < w.length; i++) w[i] = b.getFloat();
            out.put(n, w);
        }
        return out;
    }

    /** A new current version: these weights over the current ones, this tau, the learning's record. */
    public File write(Map<String, float[]> learned, double tau, Map<String, Object> record) throws IOException {
        byte[] ptd = weightsFile().clone();
        for (Map.Entry<String, float[]> e : learned.entrySet()) {
            Map<String, Object> at = asMap(layout.get(e.getKey()));
            if (at == null) throw new IOException("the training program has no weight " + e.getKey());
            int offset = ((Number) at.get("offset")).intValue(), bytes = ((Number) at.get("bytes")).intValue();
            if (e.getValue().length * 4 != bytes) throw new IOException("weight " + e.getKey() + " has the wrong size");
            ByteBuffer b = ByteBuffer.wrap(ptd, offset, bytes).order(ByteOrder.LITTLE_ENDIAN);
            for (float v : e.getValue()) b.putFloat(v);
        }
        Map<String, Object> config = Json.parseObject(Files2.readUtf8(new File(current(), CONFIG)));
        config.put("tau", tau);
        Map<String, Object> training = config.get("training") instanceof Map ? asMap(config.get("training"))
                : new LinkedHashMap<String, Object>();
        List<Object> personalized = training.get("personalized") instanceof List
                ? new ArrayList<Object>((List<?>) training.get("personalized")) : new ArrayList<Object>();
        personalized.add(record);
        training.put("personalized", personalized);
        config.put("training", training);
        return commit(ptd, Json.write(config), null);
    }

    private File commit(byte[] ptd, String configJson, byte[] safetensors) throws IOException {
        Map<String, Object> config = Json.parseObject(configJson);
        if (safetensors == null) {
            config.put("content_hash", sha256(ptd).substring(0, 16));
            safetensors = safetensorsOf(ptd);
        }
        File tmp = new File(root, ".tmp-" + Long.toHexString(System.nanoTime()));
        if (!tmp.mkdir()) throw new IOException("cannot create " + tmp);
        write(new File(tmp, PTD), ptd);
        write(new File(tmp, DIGEST), (sha256(ptd) + "\n").getBytes("UTF-8"));
        write(new File(tmp, WEIGHTS), safetensors);
        write(new File(tmp, CONFIG), (Json.write(config) + "\n").getBytes("UTF-8"));
        int next = 0;
        String[] entries = root.list();
        for (String n : entries == null ? new String[0] : entries) {
            if (n.matches("v[0-9]{6}")) next = Math.max(next, Integer.parseInt(n.substring(1)) + 1);
        }
        String name = String.format(java.util.Locale.ROOT, "v%06d", next);
        rename(tmp, new File(root, name));
        String previous = Files2.readUtf8(new File(root, CURRENT)).trim();
        File pointer = new File(root, CURRENT + ".tmp");
        write(pointer, (name + "\n").getBytes("UTF-8"));
        rename(pointer, new File(root, CURRENT)); // the one atomic step: from here on, the new plugin
        clean(name, previous);
        return new File(root, name);
    }

    private byte[] safetensorsOf(byte[] ptd) {
        Map<String, long[]> shapes = new LinkedHashMap<String, long[]>();
        Map<String, float[]> values = new LinkedHashMap<String, float[]>();
        for (String n : names) {
            Map<String, Object> at = asMap(layout.get(n));
            List<?> s = (List<?>) at.get("shape");
            long[] shape = new long[s.size()];
            for (int i = 0; i < shape.length; i++) shape[i] = ((Number) s.get(i)).longValue();
            int offset = ((Number) at.get("offset")).intValue(), bytes = ((Number) at.get("bytes")).intValue();
            float[] w = new float[bytes / 4];
            ByteBuffer b = ByteBuffer.wrap(ptd, offset, bytes).order(ByteOrder.LITTLE_ENDIAN);
            for (int i = 0; i < w.length; i++) w[i] = b.getFloat();
            shapes.put(n, shape);
            values.put(n, w);
        }
        return Safetensors.write(shapes, values);
    }

    /** Removes versions other than these two, and temporary directories of interrupted writes. */
    private void clean(String keep, String previous) {
        String[] entries = root.list();
        for (String n : entries == null ? new String[0] : entries) {
            File f = new File(root, n);
            if (!f.isDirectory() || n.equals(keep) || n.equals(previous)) continue;
            if (n.startsWith(".tmp-") || n.matches("v[0-9]{6}")) delete(f);
        }
    }

    static void write(File f, byte[] data) throws IOException {
        FileOutputStream out = new FileOutputStream(f);
        try {
            out.write(data);
            out.getFD().sync(); // on disk before the rename that publishes it
        } finally {
            out.close();
        }
    }

    /** An atomic rename (rename(2) within one file system); a hook for the tests' crashes. */
    static void rename(File from, File to) throws IOException {
        if (renamer != null) renamer.check(from, to);
        if (!from.renameTo(to)) throw new IOException("cannot rename " + from + " to " + to);
    }

    /** Tests only: called before every rename; throws to simulate a crash at that point. */
    interface Renamer {
        void check(File from, File to) throws IOException;
    }

    static Renamer renamer;

    private static void delete(File f) {
        File[] children = f.listFiles();
        if (children != null) for (File c : children) delete(c);
        f.delete();
    }

    static String sha256(byte[] data) {
        try {
            byte[] d = MessageDigest.getInstance("SHA-256").digest(data);
            StringBuilder b = new StringBuilder();
            for (byte x : d) b.append(String.format(java.util.Locale.ROOT, "%02x", x & 0xff));
            return b.toString();
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    }

    @SuppressWarnings("unchecked")
    private static Map<String, Object> asMap(Object o) {
        return (Map<String, Object>) o;
    }
}
