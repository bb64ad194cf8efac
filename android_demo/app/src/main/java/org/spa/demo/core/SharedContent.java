package org.spa.demo.core;

/**
 * What to take from an ACTION_SEND intent. When an app shares a file it often adds a caption
 * (EXTRA_TEXT: a title, "Shared from ..."): the file is the document, the caption is not.
 */
public final class SharedContent {
    public enum Source { STREAM, TEXT, NONE }

    private SharedContent() {}

    public static Source choose(boolean hasStream, CharSequence text) {
        if (hasStream) return Source.STREAM;
        if (text != null && text.toString().trim().length() > 0) return Source.TEXT;
        return Source.NONE;
    }
}
