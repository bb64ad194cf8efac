package org.spa.protocol;

/** A committed token: x_{pos+1}, decided at position pos; it is never taken back. */
public final class Commit {
    public final long pos;
    public final long token;
    public final byte[] piece; // UTF-8 bytes, possibly part of a character
    public final boolean sigma; // true when the side network decided it (the verdict's token)

    public Commit(long pos, long token, byte[] piece, boolean sigma) {
        this.pos = pos;
        this.token = token;
        this.piece = piece;
        this.sigma = sigma;
    }
}
