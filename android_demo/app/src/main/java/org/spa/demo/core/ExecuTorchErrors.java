package org.spa.demo.core;

import java.lang.reflect.Method;
import java.util.Locale;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

/**
 * ExecuTorch failures as one Java exception type with the runtime's error code
 * ({@link PluginRuntimeException}). The runtime reports a failed load or execute as an
 * ExecutorchRuntimeException with getErrorCode() (the APK's classes and the Maven AAR alike),
 * or, from older native code, as a RuntimeException (an fbjni CppException) whose message
 * names the code ("... error 0x23 ..."). Native Errors (a library that cannot load) are not
 * wrapped: they mean the runtime is unusable ({@link Failures}).
 */
public final class ExecuTorchErrors {
    /** runtime/core/error.h of ExecuTorch (the constants of org.pytorch.executorch.ExecutorchRuntimeException). */
    private static final String[][] NAMES = {
            {"0", "Ok"}, {"1", "Internal"}, {"2", "InvalidState"}, {"3", "EndOfMethod"}, {"4", "AlreadyLoaded"},
            {"16", "NotSupported"}, {"17", "NotImplemented"}, {"18", "InvalidArgument"}, {"19", "InvalidType"},
            {"20", "OperatorMissing"}, {"21", "RegistrationExceedingMaxKernels"}, {"22", "RegistrationAlreadyRegistered"},
            {"32", "NotFound"}, {"33", "MemoryAllocationFailed"}, {"34", "AccessFailed"}, {"35", "InvalidProgram"},
            {"36", "InvalidExternalData"}, {"37", "OutOfResources"}, {"48", "DelegateInvalidCompatibility"},
            {"49", "DelegateMemoryAllocationFailed"}, {"50", "DelegateInvalidHandle"},
    };
    private static final Pattern CODE = Pattern.compile("(?i)(?:error|status)(?: code)?[ :=]*(?:0x([0-9a-f]+)|(\\d+))");

    private ExecuTorchErrors() {}

    /** The ExecuTorch error code carried by {@code t}, or -1 when it carries none. */
    public static int codeOf(Throwable t) {
        for (Throwable c = t; c != null; c = c.getCause()) {
            try {
                Method m = c.getClass().getMethod("getErrorCode");
                Object v = m.invoke(c);
                if (v instanceof Number) return ((Number) v).intValue();
            } catch (ReflectiveOperationException | RuntimeException ignored) {
                // not an ExecutorchRuntimeException
            }
            String message = c.getMessage();
            Matcher m = message == null ? null : CODE.matcher(message);
            if (m != null && m.find()) return m.group(1) != null ? Integer.parseInt(m.group(1), 16) : Integer.parseInt(m.group(2));
        }
        return -1;
    }

    /** "InvalidProgram (0x23)", or "0x99" for a code this table does not know. */
    public static String name(int code) {
        String hex = String.format(Locale.US, "0x%x", code);
        for (String[] n : NAMES) if (Integer.parseInt(n[0]) == code) return n[1] + " (" + hex + ")";
        return hex;
    }

    /** {@code t} (a failed load or execute of {@code what}) as a PluginRuntimeException with its code. */
    public static PluginRuntimeException wrap(String what, RuntimeException t) {
        if (t instanceof PluginRuntimeException) return (PluginRuntimeException) t;
        return new PluginRuntimeException(what, codeOf(t), t);
    }

    /** What the runtime reported for {@code what}: a code (from an int-returning API) without an exception. */
    public static PluginRuntimeException ofCode(String what, int code) {
        return new PluginRuntimeException(what, code, null);
    }

    /** A failed ExecuTorch call, with the runtime's error code (-1: none was reported). */
    public static final class PluginRuntimeException extends RuntimeException {
        private static final long serialVersionUID = 1L;
        public final int errorCode;

        PluginRuntimeException(String what, int errorCode, Throwable cause) {
            super(message(what, errorCode, cause), cause);
            this.errorCode = errorCode;
        }

        private static String message(String what, int code, Throwable cause) {
            String detail = cause == null || cause.getMessage() == null ? "" : ": " + cause.getMessage();
            String hint = code == 0x23 || code == 0x14 || code == 0x30
                    ? " (is this .pte from a newer ExecuTorch than the app's runtime? see \"Which runtime reads which .pte\")" : "";
            return "ExecuTorch could not " + what + (code < 0 ? "" : ", error " + name(code)) + detail + hint;
        }
    }
}
