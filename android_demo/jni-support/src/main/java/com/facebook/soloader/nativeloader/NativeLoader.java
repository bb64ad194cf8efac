package com.facebook.soloader.nativeloader;

import java.io.IOException;

/**
 * The one place native libraries are loaded through, with a pluggable {@link
 * NativeLoaderDelegate}. The delegate is set once ({@link #init}); loading before that is an
 * error that says how to fix it. Thread-safe and idempotent: ExecuTorch's classes initialise it
 * with {@code if (!isInitialized()) init(new SystemDelegate())}, a check-then-act that two
 * threads (or a class whose initializer called {@link #initIfUninitialized} meanwhile) can
 * interleave; a second delegate of the same class is therefore accepted and ignored, instead of
 * failing that class's initialisation for good.
 */
public final class NativeLoader {
    private static NativeLoaderDelegate delegate;

    private NativeLoader() {}

    /**
     * Installs the delegate. Again with the same delegate, or one of the same class (the race
     * above): nothing changes. A delegate of another class is refused: libraries would load two ways.
     */
    public static synchronized void init(NativeLoaderDelegate d) {
        if (d == null) throw new IllegalArgumentException("NativeLoader.init(null)");
        if (delegate != null && delegate.getClass() != d.getClass()) {
            throw new IllegalStateException("NativeLoader is already initialized with " + delegate.getClass().getName());
        }
        if (delegate == null) delegate = d;
    }

    /** Installs {@link SystemDelegate} unless a delegate is installed already. */
    public static synchronized void initIfUninitialized() {
        if (delegate == null) delegate = new SystemDelegate();
    }

    public static synchronized boolean isInitialized() {
        return delegate != null;
    }

    public static boolean loadLibrary(String shortName) {
        return loadLibrary(shortName, 0);
    }

    /** Loads lib{@code shortName}.so through the delegate; see {@link NativeLoaderDelegate#loadLibrary}. */
    public static boolean loadLibrary(String shortName, int flags) {
        return current().loadLibrary(shortName, flags);
    }

    public static String getLibraryPath(String libName) throws IOException {
        return current().getLibraryPath(libName);
    }

    public static int getSoSourcesVersion() {
        return current().getSoSourcesVersion();
    }

    private static synchronized NativeLoaderDelegate current() {
        if (delegate == null) {
            throw new IllegalStateException("NativeLoader has no delegate: call NativeLoader.init(new SystemDelegate()) "
                    + "(or NativeLoader.initIfUninitialized()) before loading a native library");
        }
        return delegate;
    }
}
