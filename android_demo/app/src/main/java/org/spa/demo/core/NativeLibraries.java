package org.spa.demo.core;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;

/**
 * The one place the app loads ExecuTorch's native libraries, in a fixed order: **ExecuTorch
 * first, always**, then fbjni. Loading libexecutorch.so first brings libfbjni.so and
 * libc++_shared.so in as its dependencies, in one load group, so the C++ runtime symbols that
 * libexecutorch.so exports (its own, statically linked runtime) are the ones fbjni binds to;
 * the other order would bind fbjni to libc++_shared.so first, and a C++ exception thrown by
 * one runtime and caught by the other may abort the process instead of reaching Java. (The
 * library's own static initializers, e.g. fbjni's HybridData, load fbjni on first use; calling
 * {@link #ensureLoaded} before touching ExecuTorch makes that a no-op.)
 *
 * Idempotent and thread-safe: the first call loads, later calls return at once; a failed load
 * is remembered and thrown again (a half-loaded runtime is not loaded a second time).
 */
public final class NativeLibraries {
    /** The load order. */
    public static final String[] ORDER = {"executorch", "fbjni"};

    /** Loads one library by short name (the app: through SoLoader's NativeLoader, i.e. System.loadLibrary). */
    public interface Loader {
        void load(String shortName);
    }

    private static boolean loaded;
    private static Throwable failure;

    private NativeLibraries() {}

    /** Load {@link #ORDER} once; a refusal from {@code check} (non-null: one line) is thrown as an UnsupportedOperationException. */
    public static synchronized void ensureLoaded(Loader loader, String refusal) {
        if (loaded) return;
        if (failure != null) throw rethrown(failure);
        try {
            if (refusal != null) throw new UnsupportedOperationException(refusal);
            for (String name : ORDER) loader.load(name);
            loaded = true;
        } catch (RuntimeException | Error e) {
            failure = e;
            throw e;
        }
    }

    public static synchronized boolean isLoaded() {
        return loaded;
    }

    /** For tests: forget what was loaded (the JVM cannot unload it; a phone never calls this). */
    static synchronized void resetForTests() {
        loaded = false;
        failure = null;
    }

    private static RuntimeException rethrown(Throwable t) {
        if (t instanceof Error) throw (Error) t;
        return (RuntimeException) t;
    }

    /**
     * One line saying why this APK's native libraries cannot load on a device with this page
     * size, or null when they can: every LOAD segment must be aligned to at least the page size
     * (Android 15+ devices with 16 KB pages refuse 4 KB-aligned libraries). {@code alignments}:
     * library name -> its smallest LOAD alignment ({@link ElfAlignment#inApk}).
     */
    public static String pageSizeProblem(long pageSize, Map<String, Long> alignments) {
        List<String> short4 = new ArrayList<String>();
        for (Map.Entry<String, Long> e : alignments.entrySet()) {
            if (e.getValue() < pageSize) short4.add(e.getKey() + " (" + (e.getValue() / 1024) + " KB)");
        }
        if (short4.isEmpty()) return null;
        return "This phone uses " + (pageSize / 1024) + " KB memory pages, and this APK's " + join(short4)
                + (short4.size() == 1 ? " is" : " are") + " aligned for smaller pages, so ExecuTorch cannot load here:"
                + " build the app with Gradle (android_demo/README.md), whose libraries support 16 KB pages.";
    }

    private static String join(List<String> parts) {
        StringBuilder b = new StringBuilder();
        for (int i = 0; i < parts.size(); i++) b.append(i == 0 ? "" : i == parts.size() - 1 ? " and " : ", ").append(parts.get(i));
        return b.toString();
    }
}
