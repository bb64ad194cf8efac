package org.spa.demo.core;

import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;

/**
 * Calls on ExecuTorch's {@code Module} whose signature differs between releases. {@code
 * loadMethod(String)} returns void and throws in the build inside the APK made here, but returns
 * an int error code (0 = ok) in the Maven AAR: ignoring that code leaves a method that fails only
 * later, at its first {@code execute}. This works with both.
 */
public final class NativeModules {
    private NativeModules() {}

    public static void loadMethod(Object module, String name) {
        Object result;
        try {
            Method m = module.getClass().getMethod("loadMethod", String.class);
            result = m.invoke(module, name);
        } catch (NoSuchMethodException e) {
            throw new IllegalStateException(module.getClass().getName() + " has no loadMethod(String)", e);
        } catch (IllegalAccessException e) {
            throw new IllegalStateException("cannot call loadMethod: " + e, e);
        } catch (InvocationTargetException e) {
            Throwable cause = e.getCause();
            if (cause instanceof RuntimeException) throw ExecuTorchErrors.wrap("load method \"" + name + "\"", (RuntimeException) cause);
            if (cause instanceof Error) throw (Error) cause;
            throw new IllegalStateException("loadMethod(\"" + name + "\") failed: " + cause, cause);
        }
        if (result instanceof Number && ((Number) result).intValue() != 0) {
            throw ExecuTorchErrors.ofCode("load method \"" + name + "\"", ((Number) result).intValue());
        }
    }
}
