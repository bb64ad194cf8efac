package com.facebook.jni;

import com.facebook.jni.annotations.DoNotStrip;
import com.facebook.soloader.nativeloader.NativeLoader;

/**
 * Lets native code run a C++ function under a Java frame, so that class lookups made by that
 * function use the app's class loader (a thread attached from C++ would only see the system's).
 * Native code calls {@code runStdFunction(pointer)}, which calls back into libfbjni.so.
 */
@DoNotStrip
public class ThreadScopeSupport {
    static {
        NativeLoader.initIfUninitialized();
        NativeLoader.loadLibrary("fbjni");
    }

    private ThreadScopeSupport() {}

    @DoNotStrip
    private static void runStdFunction(long pointer) {
        runStdFunctionImpl(pointer);
    }

    private static native void runStdFunctionImpl(long pointer);
}
