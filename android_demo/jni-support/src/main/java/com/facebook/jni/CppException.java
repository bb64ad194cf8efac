package com.facebook.jni;

import com.facebook.jni.annotations.DoNotStrip;

/** A C++ exception that crossed into Java (fbjni translates it; the message is its what()). */
@DoNotStrip
public class CppException extends RuntimeException {
    private static final long serialVersionUID = 1L;

    @DoNotStrip
    public CppException(String message) {
        super(message);
    }
}
