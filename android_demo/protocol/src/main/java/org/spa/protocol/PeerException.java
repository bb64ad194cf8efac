package org.spa.protocol;

/** The other side sent an `error` message; reported to the user, never answered. */
public class PeerException extends Exception {
    private static final long serialVersionUID = 1L;
    public final String code; // may be a code this version does not know
    public final String detail;

    public PeerException(String code, String detail) {
        super("peer reported " + code + ": " + detail);
        this.code = code;
        this.detail = detail;
    }
}
