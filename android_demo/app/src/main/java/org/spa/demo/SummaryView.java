package org.spa.demo;

import android.graphics.Color;
import android.text.SpannableStringBuilder;
import android.text.Spanned;
import android.text.style.BackgroundColorSpan;
import android.widget.TextView;

/**
 * The summary as it streams in: committed text only (never taken back), with the
 * tokens the side network decided (sigma = 1) on a highlighted background.
 */
final class SummaryView {
    static final int SIDE_COLOR = Color.rgb(255, 224, 130);
    private final TextView view;
    private final SpannableStringBuilder text = new SpannableStringBuilder();

    SummaryView(TextView view) {
        this.view = view;
    }

    void clear() {
        text.clear();
        text.clearSpans();
        view.setText(text);
    }

    /** Append the characters one commit completed; sigma marks the side network's tokens. */
    void append(String piece, boolean sigma) {
        if (piece.isEmpty()) return;
        int start = text.length();
        text.append(piece);
        if (sigma) text.setSpan(new BackgroundColorSpan(SIDE_COLOR), start, text.length(), Spanned.SPAN_EXCLUSIVE_EXCLUSIVE);
        view.setText(text);
    }
}
