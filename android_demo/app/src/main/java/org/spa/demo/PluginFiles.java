package org.spa.demo;

import java.io.File;
import java.io.IOException;
import java.io.InputStream;

import android.content.Context;
import android.database.Cursor;
import android.net.Uri;
import android.provider.OpenableColumns;

import org.spa.demo.core.PluginImport;

/**
 * Where the reader's plugin comes from: a path (e.g. pushed with adb to
 * /data/local/tmp/spa), or a file picked from storage, which ExecuTorch cannot
 * open by URI and is therefore copied into the app's private files first
 * (PluginImport: sanitized name, content digest in the name, atomic copy).
 * Call {@link #importPicked} off the main thread: it reads the whole file.
 */
final class PluginFiles {
    static final String DEFAULT_PTE = "/data/local/tmp/spa/plugin-fp32.pte";

    private PluginFiles() {}

    /** Copy a picked document into files/plugins/ and return its path. */
    static String importPicked(Context context, Uri uri) throws IOException {
        InputStream in = context.getContentResolver().openInputStream(uri);
        if (in == null) throw new IOException("cannot open " + uri);
        try {
            return PluginImport.copy(in, new File(context.getFilesDir(), "plugins"), displayName(context, uri)).getAbsolutePath();
        } finally {
            in.close();
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
