package org.spa.demo.core;

import java.io.File;
import java.io.IOException;

/**
 * Where benchmark mode may write its result: only inside the app's own folders. (The activity is
 * started over adb; an intent extra must not make the app write anywhere it can.)
 */
public final class OutputPaths {
    private OutputPaths() {}

    /**
     * @param requested the {@code out} extra, or null for {@code fallback}
     * @param allowed folders the file may be in (at any depth); null entries are ignored
     * @throws IOException naming the allowed folders when {@code requested} is outside them
     */
    public static File resolve(String requested, File fallback, File... allowed) throws IOException {
        File target = requested == null || requested.trim().isEmpty() ? fallback : new File(requested.trim());
        String path = target.getCanonicalPath();
        StringBuilder names = new StringBuilder();
        for (File dir : allowed) {
            if (dir == null) continue;
            String root = dir.getCanonicalPath();
            if (path.startsWith(root + File.separator)) return new File(path);
            names.append(names.length() == 0 ? "" : " or ").append(root);
        }
        throw new IOException("refusing to write " + target + ": benchmark results go under " + names);
    }
}
