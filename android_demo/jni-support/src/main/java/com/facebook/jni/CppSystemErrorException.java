package com.facebook.jni;

import com.facebook.jni.annotations.DoNotStrip;

/** A C++ std::system_error that crossed into Java, with its error code. */
@DoNotStrip
public class CppSystemErrorException extends CppException {
    private static final long serialVersionUID = 1L;
    private final int errorCode;

    @DoNotStrip
    public CppSystemErrorException(String message, int errorCode) {
        super(message);
        this.errorCode = errorCode;
    }

    public int getErrorCode() {
        return errorCode;
    }
}
