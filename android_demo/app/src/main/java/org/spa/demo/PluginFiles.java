package org.spa.demo;

import java.io.File;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;

import android.content.Context;
import android.database.Cursor;
import android.net.Uri;
import android.provider.OpenableColumns;

import org.spa.protocol.PluginConfig;

/**
 * Where the reader's plugin comes from: a path (e.g. pushed with adb to
 * /data/local/tmp/spa), or a file picked from storage, which ExecuTorch cannot
 * open by URI and is therefore copied into the app's private files first.
 */
final class PluginFiles {
    static final String DEFAULT_PTE = "/data/local/tmp/spa/plugin-fp32.pte";

    private PluginFiles() {}

    /** Copy a picked document into files/plugins/ and return its path. */
    static String importPicked(Context context, Uri uri) throws IOException {
        String name = displayName(context, uri);
        if (name == null || !name.endsWith(".pte")) name = "picked-plugin.pte";
        File dir = new File(context.getFilesDir(), "plugins");
        if (!dir.isDirectory() && !dir.mkdirs()) throw new IOException("cannot create " + dir);
        File target = new File(dir, name);
        InputStream in = context.getContentResolver().openInputStream(uri);
        if (in == null) throw new IOException("cannot open " + uri);
        OutputStream out = new FileOutputStream(target);
        try {
            byte[] buf = new byte[1 << 16];
            int n;
            while ((n = in.read(buf)) > 0) out.write(buf, 0, n);
        } finally {
            in.close();
            out.close();
        }
        return target.getAbsolutePath();
    }

    /**
     * The config.json beside a .pte, if there is one, must describe the same plugin
     * as the program's embedded config (same content hash). Returns a warning or null.
     */
    static String checkSidecarConfig(String ptePath, PluginConfig embedded) {
        File sidecar = new File(new File(ptePath).getParentFile(), "config.json");
        if (!sidecar.isFile()) return null;
        try {
            PluginConfig beside = PluginConfig.load(sidecar);
            if (!beside.contentHash.equals(embedded.contentHash)) {
                return "config.json beside the .pte is for plugin " + beside.contentHash
                        + ", the .pte holds " + embedded.contentHash + "; using the .pte's";
            }
            return null;
        } catch (IOException e) {
            return "ignoring " + sidecar + ": " + e.getMessage();
        }
    }

    private static String displayName(Context context, Uri uri) {
        Cursor c = context.getContentResolver().query(uri, new String[] {OpenableColumns.DISPLAY_NAME}, null, null, null);
        if (c == null) return null;
        try {
            return c.moveToFirst() ? c.getString(0) : null;
        } finally {
            c.close();
        }
    }
}
