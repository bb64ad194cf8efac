package com.facebook.jni;

import com.facebook.jni.annotations.DoNotStrip;

/**
 * A {@link Runnable} whose {@link #run()} calls a C++ function object. Created only by native
 * code (constructor {@code (HybridData)}); libfbjni.so registers {@code run} when loaded.
 */
@DoNotStrip
public class NativeRunnable implements Runnable {
    @DoNotStrip
    private final HybridData mHybridData;

    @DoNotStrip
    private NativeRunnable(HybridData hybridData) {
        mHybridData = hybridData;
    }

    @Override
    public native void run();
}
