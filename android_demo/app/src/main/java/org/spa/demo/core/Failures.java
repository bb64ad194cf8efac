package org.spa.demo.core;

/**
 * Turns anything a worker thread caught into one line a user can act on. Native trouble arrives
 * as Errors, not RuntimeExceptions: a missing or wrong-ABI native library is an
 * UnsatisfiedLinkError, a failing static initializer an ExceptionInInitializerError (and every
 * later use of that class a NoClassDefFoundError).
 */
public final class Failures {
    private Failures() {}

    public static String describe(Throwable t) {
        Throwable root = t;
        if (root instanceof ExceptionInInitializerError && root.getCause() != null) root = root.getCause();
        if (root instanceof UnsatisfiedLinkError) {
            return "The ExecuTorch native runtime could not be loaded: " + root.getMessage()
                    + ". This APK has no native library for this device's ABI, or one it needs is missing"
                    + " (see android_demo/README.md).";
        }
        if (root instanceof NoClassDefFoundError) {
            return "A class the plugin runtime needs is missing or failed to initialize earlier: " + root.getMessage()
                    + " (restart the app; if it persists, this APK lacks part of the ExecuTorch runtime).";
        }
        if (root instanceof LinkageError) {
            return "The plugin runtime does not match this app (" + root + ").";
        }
        if (root instanceof OutOfMemoryError) {
            return "Out of memory while running the plugin (" + root.getMessage() + ").";
        }
        String message = root.getMessage();
        // written for the user already: a 16 KB page refusal, a .pte that cannot upload, an ExecuTorch error with its code
        if (message != null && (root instanceof UnsupportedOperationException
                || root instanceof ExecuTorchErrors.PluginRuntimeException)) {
            return message;
        }
        return root.getClass().getSimpleName() + (message == null ? "" : ": " + message);
    }

    /** True for failures after which this process should not touch the runtime again. */
    public static boolean isFatal(Throwable t) {
        return t instanceof LinkageError || t instanceof VirtualMachineError
                || (t instanceof ExceptionInInitializerError);
    }
}
