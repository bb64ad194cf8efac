package org.spa.protocol;

/** A session failed; the message is meant for the user (no stack trace needed). */
public class ClientException extends Exception {
    private static final long serialVersionUID = 1L;

    public ClientException(String message) {
        super(message);
    }
}
