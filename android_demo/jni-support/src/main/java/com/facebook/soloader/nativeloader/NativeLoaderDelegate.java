package com.facebook.soloader.nativeloader;

import java.io.IOException;

/**
 * How {@link NativeLoader} loads a native library. The ExecuTorch classes install
 * {@link SystemDelegate} when nothing else was installed first.
 */
public interface NativeLoaderDelegate {
    /** Flag for {@link #loadLibrary}: load the library only, without its dependencies first. */
    int SKIP_MERGED_JNI_ONLOAD = 1;

    /**
     * Loads lib{@code shortName}.so (and runs its JNI_OnLoad). Returns true if this call loaded
     * it, false if it was loaded already; throws {@link UnsatisfiedLinkError} if it cannot.
     */
    boolean loadLibrary(String shortName, int flags);

    /** The path of the file the library was or would be loaded from, or null if unknown. */
    String getLibraryPath(String libName) throws IOException;

    /** A number that changes when the places libraries are looked up in change. */
    int getSoSourcesVersion();
}
