package com.facebook.jni.annotations;

import java.lang.annotation.ElementType;
import java.lang.annotation.Retention;
import java.lang.annotation.RetentionPolicy;
import java.lang.annotation.Target;

/** Like {@link DoNotStrip}, for a whole class and all its members. No effect at run time. */
@Retention(RetentionPolicy.CLASS)
@Target(ElementType.TYPE)
public @interface DoNotStripAny {}
