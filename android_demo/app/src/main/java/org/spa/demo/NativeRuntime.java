package org.spa.demo;

import java.io.File;
import java.io.IOException;

import android.content.Context;
import android.os.Build;
import android.util.Log;

import com.facebook.soloader.nativeloader.NativeLoader;
import com.facebook.soloader.nativeloader.SystemDelegate;

import org.spa.demo.core.ElfAlignment;
import org.spa.demo.core.NativeLibraries;
import org.spa.demo.core.PageSize;

/**
 * The app's native runtime, loaded in one place ({@link NativeLibraries}: ExecuTorch first,
 * then fbjni) before anything touches {@code org.pytorch.executorch}. {@link #check} looks
 * once, at start, whether this phone's page size fits the libraries inside this APK: on a 16 KB
 * page phone with the 4 KB-aligned libraries of the APK built without Gradle, {@link #ensureLoaded}
 * then throws one line that says so, instead of a failed load.
 */
final class NativeRuntime {
    private static volatile String refusal;

    private NativeRuntime() {}

    /** Read this phone's page size and the LOAD alignment of this APK's libraries for its ABI. */
    static void check(Context context) {
        try {
            long page = PageSize.current();
            String abi = Build.SUPPORTED_ABIS.length > 0 ? Build.SUPPORTED_ABIS[0] : "";
            refusal = NativeLibraries.pageSizeProblem(page, ElfAlignment.inApk(new File(context.getApplicationInfo().sourceDir), abi));
            if (refusal != null) Log.w("SPA", refusal);
        } catch (IOException | RuntimeException e) { // cannot tell: try to load, and report what happens
            Log.w("SPA", "could not check the page size against the native libraries: " + e);
        }
    }

    /** Load the native libraries (once; thread-safe); the page-size refusal, if any, as an exception. */
    static void ensureLoaded() {
        NativeLibraries.ensureLoaded(new NativeLibraries.Loader() {
            @Override
            public void load(String name) {
                if (!NativeLoader.isInitialized()) NativeLoader.init(new SystemDelegate()); // as ExecuTorch's classes do
                NativeLoader.loadLibrary(name);
            }
        }, refusal);
    }
}
