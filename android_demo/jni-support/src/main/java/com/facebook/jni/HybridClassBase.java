package com.facebook.jni;

import com.facebook.jni.annotations.DoNotStrip;

/**
 * A hybrid class that is its own {@link HybridData}: native code that finds this class among an
 * object's superclasses keeps the C++ pointer in the object itself instead of in a separate
 * {@code mHybridData} field.
 */
@DoNotStrip
public abstract class HybridClassBase extends HybridData {}
