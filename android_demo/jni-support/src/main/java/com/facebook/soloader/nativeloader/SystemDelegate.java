package com.facebook.soloader.nativeloader;

/**
 * Loads native libraries with {@link System#loadLibrary}: from the app's native library folder,
 * which is where the installer puts lib/ABI/*.so of the APK.
 */
public class SystemDelegate implements NativeLoaderDelegate {
    @Override
    public boolean loadLibrary(String shortName, int flags) {
        System.loadLibrary(shortName);
        return true;
    }

    @Override
    public String getLibraryPath(String libName) {
        return null; // System.loadLibrary does not say where it found a library
    }

    @Override
    public int getSoSourcesVersion() {
        return 0;
    }
}
