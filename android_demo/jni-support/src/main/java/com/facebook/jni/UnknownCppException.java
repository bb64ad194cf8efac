package com.facebook.jni;

import com.facebook.jni.annotations.DoNotStrip;

/** Something thrown in C++ that is not a std::exception. */
@DoNotStrip
public class UnknownCppException extends CppException {
    private static final long serialVersionUID = 1L;

    @DoNotStrip
    public UnknownCppException() {
        super("Unknown");
    }

    @DoNotStrip
    public UnknownCppException(String message) {
        super(message);
    }
}
