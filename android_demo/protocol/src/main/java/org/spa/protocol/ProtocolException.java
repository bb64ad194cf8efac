package org.spa.protocol;

/**
 * A protocol violation detected on this side: send `error(code, message)` and
 * close the websocket with {@link #closeCode()}. Mirrors spa.protocol.errors.ProtocolError.
 */
public class ProtocolException extends Exception {
    private static final long serialVersionUID = 1L;
    public final String code;
    public final String detail;

    public ProtocolException(String code, String detail) {
        super(code + ": " + detail);
        if (!ErrorCodes.isKnown(code)) throw new IllegalArgumentException("unknown protocol error code " + code);
        this.code = code;
        this.detail = detail;
    }

    public int closeCode() {
        return ErrorCodes.closeCode(code);
    }
}
