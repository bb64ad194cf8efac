package org.spa.protocol;

/**
 * The device builds the prompt exactly as the plugin was trained with
 * (spa/data/prompts.py plain_document + format_prompt): the plugin config's chat
 * template, with its instruction and the document put in.
 */
public final class Prompts {
    private Prompts() {}

    /**
     * Any text as a document (docs/PROTOCOL.md section 4, "The prompt", step 3): split at runs of
     * whitespace as Python's str.split() does ({@link #isSpace}), the words joined with one space,
     * then cut at a word boundary to at most 4 * maxDocTokens code points.
     */
    public static String plainDocument(String text, int maxDocTokens) {
        StringBuilder b = new StringBuilder(text.length());
        int i = 0, n = text.length();
        while (i < n) {
            while (i < n && isSpace(text.charAt(i))) i++;
            int start = i;
            while (i < n && !isSpace(text.charAt(i))) i++;
            if (i > start) {
                if (b.length() > 0) b.append(' ');
                b.append(text, start, i);
            }
        }
        String t = b.toString();
        int limit = 4 * maxDocTokens;
        if (t.codePointCount(0, t.length()) <= limit) return t;
        int end = t.offsetByCodePoints(0, limit);
        int cut = t.lastIndexOf(' ', end - 1);
        return t.substring(0, cut > 0 ? cut : end);
    }

    /**
     * Whitespace as Python's str.isspace() has it, the spec's list: U+0009 to U+000D, U+001C to
     * U+001F, U+0020, U+0085, U+00A0, U+1680, U+2000 to U+200A, U+2028, U+2029, U+202F, U+205F,
     * U+3000. All in the BMP, so a surrogate (half of a supplementary character) is never one.
     */
    public static boolean isSpace(char c) {
        if (c <= 0x20) return c == 0x20 || (c >= 0x09 && c <= 0x0d) || (c >= 0x1c && c <= 0x1f);
        if (c < 0x85) return false;
        if (c <= 0x3000) {
            return c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a) || c == 0x2028
                    || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
        }
        return false;
    }

    /** str.replace, not a format: documents contain braces; the document goes in last. */
    public static String format(String template, String document, String instruction) {
        return template.replace("{instruction}", instruction).replace("{document}", document);
    }

    /** The full prompt for a raw document and a plugin. */
    public static String forDocument(PluginConfig config, String rawText) {
        return format(config.promptTemplate, plainDocument(rawText, config.maxDocTokens), config.instruction);
    }
}
