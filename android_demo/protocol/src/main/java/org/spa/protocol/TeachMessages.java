package org.spa.protocol;

import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.Map;

/**
 * The teaching pair (docs/PROTOCOL.md section 4 `teach`, `states`; section 6 "Teaching"; reference
 * spa/protocol/teach_messages.py): the device asks for the backbone's states at an example's
 * summary positions, the gateway answers with rows of them. The plugin's weights never travel.
 */
public final class TeachMessages {
    private TeachMessages() {}

    /** device -> gateway: one example to learn from. */
    public static final class Teach extends Messages.Message {
        public final String token; // "" when the gateway needs none
        public final Messages.Plugin plugin;
        public final String prompt; // formatted by the device, the example's document in it
        public final String summary; // what the plugin should have written; the gateway appends EOS
        public final String codec;
        public final int outliers;
        public final boolean margin; // ask for the backbone's top-2 logit margins (a margin gate)
        public final Messages.Projection projection; // cloud-side projection, or null

        public Teach(String token, Messages.Plugin plugin, String prompt, String summary, String codec, int outliers,
                     boolean margin, Messages.Projection projection) {
            this.token = token;
            this.plugin = plugin;
            this.prompt = prompt;
            this.summary = summary;
            this.codec = codec;
            this.outliers = outliers;
            this.margin = margin;
            this.projection = projection;
        }

        @Override
        public String type() {
            return "teach";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("token", token);
            d.put("plugin", plugin.toMap());
            d.put("prompt", prompt);
            d.put("summary", summary);
            d.put("codec", codec);
            d.put("outliers", (long) outliers);
            if (margin) d.put("margin", true);
            if (projection != null) d.put("projection", projection.toMap());
            return d;
        }

        static Teach read(Fields f) throws ProtocolException {
            String token = f.text("token");
            Messages.Plugin plugin = Messages.Plugin.read(f.map("plugin"));
            String prompt = f.text("prompt", -1), summary = f.text("summary", -1);
            String codec = f.text("codec", Fields.MAX_NAME, Messages.CODECS);
            int outliers = (int) f.integer("outliers", 0, ActivationCodec.MAX_COLS);
            boolean margin = f.d.get("margin") != null && f.flag("margin");
            Messages.Projection projection = f.d.get("projection") == null ? null
                    : Messages.Projection.read(f.map("projection"));
            return new Teach(token, plugin, prompt, summary, codec, outliers, margin, projection);
        }
    }

    /** gateway -> device: consecutive rows of an example's states. */
    public static final class States extends Messages.Message {
        public final long first; // index among the summary tokens of this message's first row
        public final long total; // the example's summary tokens, EOS included
        public final long promptTokens; // P
        public final long[] targets; // the token each row predicts
        public final Activation f; // rows x H
        public final Activation taps; // rows * len(plugin.taps) x H (x r with the cloud-side projection)
        public final float[] margins; // one per row, or null

        public States(long first, long total, long promptTokens, long[] targets, Activation f, Activation taps,
                      float[] margins) {
            this.first = first;
            this.total = total;
            this.promptTokens = promptTokens;
            this.targets = targets;
            this.f = f;
            this.taps = taps;
            this.margins = margins;
        }

        @Override
        public String type() {
            return "states";
        }

        @Override
        public Map<String, Object> toMap() {
            Map<String, Object> d = start();
            d.put("first", first);
            d.put("total", total);
            d.put("prompt_tokens", promptTokens);
            ByteBuffer t = ByteBuffer.allocate(4 * targets.length).order(ByteOrder.LITTLE_ENDIAN);
            for (long x : targets) t.putInt((int) x);
            d.put("targets", t.array());
            d.put("f", f.encoded);
            d.put("taps", taps.encoded);
            if (margins != null) {
                ByteBuffer m = ByteBuffer.allocate(4 * margins.length).order(ByteOrder.LITTLE_ENDIAN);
                for (float x : margins) m.putFloat(x);
                d.put("margins", m.array());
            }
            return d;
        }

        static States read(Fields g) throws ProtocolException {
            long first = g.integer("first"), total = g.integer("total", 1, Fields.INT32_MAX);
            long promptTokens = g.integer("prompt_tokens", 1, Fields.INT32_MAX);
            byte[] raw = g.blob("targets");
            String why = "expected uint32 little-endian token ids below 2^31";
            if (raw.length % 4 != 0) throw g.bad("targets", why);
            ByteBuffer b = ByteBuffer.wrap(raw).order(ByteOrder.LITTLE_ENDIAN);
            long[] targets = new long[raw.length / 4];
            for (int i = 0; i < targets.length; i++) {
                targets[i] = b.getInt() & 0xffffffffL;
                if (targets[i] > Fields.INT32_MAX) throw g.bad("targets", why);
            }
            Activation f = g.activation("f");
            Activation taps = g.activation("taps");
            float[] margins = null;
            if (g.d.get("margins") != null) {
                byte[] m = g.blob("margins");
                String bad = "expected finite float32 values >= 0, little-endian";
                if (m.length % 4 != 0) throw g.bad("margins", bad);
                ByteBuffer mb = ByteBuffer.wrap(m).order(ByteOrder.LITTLE_ENDIAN);
                margins = new float[m.length / 4];
                for (int i = 0; i < margins.length; i++) {
                    margins[i] = mb.getFloat();
                    if (Float.isNaN(margins[i]) || Float.isInfinite(margins[i]) || margins[i] < 0) {
                        throw g.bad("margins", bad);
                    }
                }
            }
            return new States(first, total, promptTokens, targets, f, taps, margins);
        }
    }
}
