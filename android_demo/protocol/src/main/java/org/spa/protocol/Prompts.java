package org.spa.protocol;

/**
 * The device builds the prompt exactly as the plugin was trained with
 * (spa/data.py plain_document + format_prompt): the plugin config's chat
 * template, with its instruction and the document put in.
 */
public final class Prompts {
    private Prompts() {}

    /** Any text as a document: whitespace collapsed, cut at a word boundary to about maxDocTokens tokens (4 characters each). */
    public static String plainDocument(String text, int maxDocTokens) {
        StringBuilder b = new StringBuilder();
        for (String word : text.trim().split("\\s+")) {
            if (word.isEmpty()) continue;
            if (b.length() > 0) b.append(' ');
            b.append(word);
        }
        String t = b.toString();
        int limit = 4 * maxDocTokens;
        if (t.codePointCount(0, t.length()) <= limit) return t;
        int end = t.offsetByCodePoints(0, limit);
        int cut = t.lastIndexOf(' ', end - 1);
        return t.substring(0, cut > 0 ? cut : end);
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
