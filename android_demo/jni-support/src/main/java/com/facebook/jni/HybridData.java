package com.facebook.jni;

import com.facebook.jni.annotations.DoNotStrip;
import com.facebook.soloader.nativeloader.NativeLoader;

/**
 * Holds the C++ half of a "hybrid" object (a Java object with native state, e.g. an ExecuTorch
 * Module). fbjni's native code creates it with the no-argument constructor, stores the C++
 * pointer in {@code mDestructor.mNativePointer} (both field names are read by JNI), and frees
 * it through {@link Destructor#deleteNative}, which libfbjni.so registers when it is loaded.
 *
 * <p>The native object is deleted by {@link #resetNative()} on the calling thread, or else on
 * the {@link DestructorThread} once this object is unreachable.
 */
@DoNotStrip
public class HybridData {
    static {
        NativeLoader.initIfUninitialized();
        NativeLoader.loadLibrary("fbjni"); // its JNI_OnLoad registers Destructor.deleteNative
    }

    @DoNotStrip
    private final Destructor mDestructor = new Destructor(this);

    /** Deletes the native object now (idempotent). */
    public synchronized void resetNative() {
        mDestructor.destruct();
    }

    /** Whether a native object is attached and not yet deleted. */
    public boolean isValid() {
        return mDestructor.mNativePointer != 0;
    }

    /** The clean-up of one HybridData: deletes the C++ object at {@code mNativePointer}. */
    @DoNotStrip
    public static class Destructor extends DestructorThread.Destructor {
        @DoNotStrip
        private volatile long mNativePointer; // written by native code

        Destructor(Object owner) {
            super(owner);
        }

        @Override
        protected final synchronized void destruct() {
            long pointer = mNativePointer;
            mNativePointer = 0;
            if (pointer != 0) deleteNative(pointer);
        }

        static native void deleteNative(long pointer);
    }
}
