package com.facebook.jni;

import java.util.Iterator;

import com.facebook.jni.annotations.DoNotStrip;

/**
 * Walks a Java collection from C++ with one call per element: {@link #hasNext()} advances and
 * leaves the element in {@code mElement} (read by JNI), or returns false at the end.
 */
@DoNotStrip
public class IteratorHelper {
    private final Iterator<?> iterator;

    @DoNotStrip
    private Object mElement;

    @DoNotStrip
    public IteratorHelper(Iterator<?> iterator) {
        this.iterator = iterator;
    }

    @DoNotStrip
    public IteratorHelper(Iterable<?> iterable) {
        this(iterable.iterator());
    }

    @DoNotStrip
    boolean hasNext() {
        if (iterator.hasNext()) {
            mElement = iterator.next();
            return true;
        }
        mElement = null;
        return false;
    }
}
