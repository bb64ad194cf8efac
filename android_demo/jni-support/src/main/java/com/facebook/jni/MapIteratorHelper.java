package com.facebook.jni;

import java.util.Iterator;
import java.util.Map;

import com.facebook.jni.annotations.DoNotStrip;

/**
 * Walks a Java map from C++ with one call per entry: {@link #hasNext()} advances and leaves the
 * entry in {@code mKey} and {@code mValue} (read by JNI), or returns false at the end.
 */
@DoNotStrip
public class MapIteratorHelper {
    private final Iterator<? extends Map.Entry<?, ?>> iterator;

    @DoNotStrip
    private Object mKey;

    @DoNotStrip
    private Object mValue;

    @DoNotStrip
    public MapIteratorHelper(Map<?, ?> map) {
        this.iterator = map.entrySet().iterator();
    }

    @DoNotStrip
    boolean hasNext() {
        if (iterator.hasNext()) {
            Map.Entry<?, ?> e = iterator.next();
            mKey = e.getKey();
            mValue = e.getValue();
            return true;
        }
        mKey = null;
        mValue = null;
        return false;
    }
}
