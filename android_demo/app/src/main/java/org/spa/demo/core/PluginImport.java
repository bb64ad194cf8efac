package org.spa.demo.core;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.Locale;

/**
 * Copies a picked plugin into the app's private storage (ExecuTorch needs a file path, not a
 * content URI):
 * <ul>
 *   <li>the name comes from the picked document's display name, which another app controls:
 *       only its last path part, in letters, digits, '.', '_' and '-', at most 64 characters;
 *   <li>the content decides the file: the name carries a digest of it, so picking a different
 *       file with the same display name yields a new path (and the session loads it), while
 *       picking the same file again reuses the copy;
 *   <li>the copy is written to a temporary file and renamed when complete, so a failed or
 *       interrupted copy never leaves a truncated .pte under a real name.
 * </ul>
 */
public final class PluginImport {
    public static final long MAX_PLUGIN_BYTES = 512L << 20;

    private PluginImport() {}

    /** A safe file name ending in .pte for a display name from another app. */
    public static String sanitize(String displayName) {
        String name = displayName == null ? "" : displayName;
        int slash = Math.max(name.lastIndexOf('/'), name.lastIndexOf('\\'));
        name = name.substring(slash + 1);
        StringBuilder out = new StringBuilder();
        for (int i = 0; i < name.length(); i++) {
            char c = name.charAt(i);
            boolean ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_';
            out.append(ok ? c : '_');
        }
        String s = out.toString().replaceAll("_+", "_").replaceAll("^[._-]+", "");
        if (s.toLowerCase(Locale.ROOT).endsWith(".pte")) s = s.substring(0, s.length() - 4);
        if (s.length() > 60) s = s.substring(0, 60);
        if (s.isEmpty()) s = "plugin";
        return s + ".pte";
    }

    /**
     * Copies {@code in} into {@code dir} as {@code <sanitized stem>-<12 hex digits of its SHA-256>.pte}
     * and returns that file. Does not close {@code in}.
     */
    public static File copy(InputStream in, File dir, String displayName) throws IOException {
        return copy(in, dir, displayName, MAX_PLUGIN_BYTES);
    }

    public static File copy(InputStream in, File dir, String displayName, long maxBytes) throws IOException {
        if (!dir.isDirectory() && !dir.mkdirs()) throw new IOException("cannot create " + dir);
        MessageDigest sha;
        try {
            sha = MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IOException("no SHA-256", e);
        }
        File tmp = File.createTempFile(".import-", ".tmp", dir);
        boolean done = false;
        try {
            FileOutputStream out = new FileOutputStream(tmp);
            try {
                byte[] buf = new byte[1 << 16];
                long total = 0;
                int n;
                while ((n = in.read(buf)) > 0) {
                    total += n;
                    if (total > maxBytes) throw new IOException("larger than " + (maxBytes >> 20) + " MB: not a plugin");
                    sha.update(buf, 0, n);
                    out.write(buf, 0, n);
                }
                if (total == 0) throw new IOException("the picked file is empty");
                out.getFD().sync();
            } finally {
                out.close();
            }
            String stem = sanitize(displayName);
            stem = stem.substring(0, stem.length() - 4);
            File target = new File(dir, stem + "-" + hex(sha.digest(), 6) + ".pte");
            if (target.isFile() && target.length() == tmp.length()) {
                done = true; // the same content was imported before: keep that copy
                return target;
            }
            if (!tmp.renameTo(target)) throw new IOException("cannot rename " + tmp + " to " + target);
            done = true;
            return target;
        } finally {
            if (!done || tmp.exists()) {
                // a failed copy, or a duplicate: the temporary file goes
                if (!tmp.delete() && tmp.exists()) tmp.deleteOnExit();
            }
        }
    }

    private static String hex(byte[] b, int bytes) {
        StringBuilder s = new StringBuilder();
        for (int i = 0; i < bytes; i++) s.append(String.format(Locale.ROOT, "%02x", b[i] & 0xff));
        return s.toString();
    }
}
