package com.facebook.jni.annotations;

import java.lang.annotation.ElementType;
import java.lang.annotation.Retention;
import java.lang.annotation.RetentionPolicy;
import java.lang.annotation.Target;

/**
 * Marks code that native code reaches by name (JNI), so that a shrinker keeps it. The ExecuTorch
 * classes carry it; it has no effect at run time. Written for this project from fbjni's documented
 * contract (see android_demo/jni-support/README.md).
 */
@Retention(RetentionPolicy.CLASS)
@Target({ElementType.TYPE, ElementType.FIELD, ElementType.METHOD, ElementType.CONSTRUCTOR})
public @interface DoNotStrip {}
