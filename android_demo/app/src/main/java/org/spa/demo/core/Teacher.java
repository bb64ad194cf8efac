package org.spa.demo.core;

import java.io.File;
import java.io.IOException;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.spa.protocol.ClientException;
import org.spa.protocol.Files2;
import org.spa.protocol.Json;
import org.spa.protocol.PluginConfig;
import org.spa.protocol.Prompts;
import org.spa.protocol.TeachClient;
import org.spa.protocol.TeachSession;

/**
 * The app's "Teach" action, without Android: the reader corrected a summary; the phone learns
 * from it in the background and the next summary uses the new plugin.
 *
 * <ol>
 *   <li>the example (the document and the corrected summary) joins the reader's examples, kept in
 *       the store on the phone ({@code examples.json}, the last {@link #KEEP}); they leave the phone
 *       only as the text of a `teach`, as every document does;</li>
 *   <li>the backbone's states at their summary positions come from the gateway ({@link StatesSource}:
 *       TeachClient, docs/PROTOCOL.md section 6 "Teaching");</li>
 *   <li>the trainer learns from them ({@link PluginTrainer}; ExecuTorch in the app);</li>
 *   <li>the store writes the new version atomically ({@link PersonalStore}): the next session,
 *       which loads the store's current version, uses it; a crash before that leaves the old one.</li>
 * </ol>
 * Runs on the calling thread (the app calls it on a worker thread); progress goes to the {@link Ui}.
 */
public final class Teacher {
    public static final int KEEP = 20;
    static final String EXAMPLES = "examples.json";

    public interface StatesSource {
        List<TeachSession.ExampleStates> fetch(List<String[]> promptSummary, TeachClient.Progress progress)
                throws ClientException;
    }

    public interface Ui {
        void progress(String stage, int done, int total);

        void learned(File version, double tau);

        void failed(String message, Throwable cause);
    }

    private final PersonalStore store;
    private final StatesSource source;
    private final PluginTrainer trainer;

    public Teacher(PersonalStore store, StatesSource source, PluginTrainer trainer) {
        this.store = store;
        this.source = source;
        this.trainer = trainer;
    }

    /** One Teach: learn from the corrected summary of this document (with the examples kept before). */
    public File teach(String document, String summary, final Ui ui) {
        try {
            if (document.trim().isEmpty() || summary.trim().isEmpty()) {
                throw new IllegalArgumentException("a document and its corrected summary are both needed");
            }
            List<String[]> kept = keep(document, summary);
            PluginConfig config = store.config();
            List<String[]> pairs = new ArrayList<String[]>();
            for (String[] e : kept) pairs.add(new String[] {Prompts.forDocument(config, e[0]), e[1]});
            ui.progress("states from the gateway", 0, pairs.size());
            List<TeachSession.ExampleStates> states = source.fetch(pairs, new TeachClient.Progress() {
                @Override
                public void fetched(int done, int total) {
                    ui.progress("states from the gateway", done, total);
                }
            });
            PluginTrainer.Learned learned = trainer.learn(store.pte(), new File(store.current(), PersonalStore.PTD),
                    states, config.tau, new PluginTrainer.Progress() {
                        @Override
                        public void step(int done, int total) {
                            ui.progress("learning", done, total);
                        }
                    });
            Map<String, Object> record = new LinkedHashMap<String, Object>(learned.record);
            record.put("examples", (long) kept.size());
            File version = store.write(learned.weights, learned.tau, record);
            ui.learned(version, learned.tau);
            return version;
        } catch (Throwable t) { // a worker thread must never take the app down; the store keeps its plugin
            ui.failed("Teach failed: " + Failures.describe(t), t);
            return null;
        }
    }

    /** The kept examples with this one last (the oldest dropped beyond KEEP), written atomically. */
    List<String[]> keep(String document, String summary) throws IOException {
        File file = new File(store.root, EXAMPLES);
        List<String[]> kept = new ArrayList<String[]>();
        if (file.isFile()) {
            for (Object o : (List<?>) Json.parse(Files2.readUtf8(file))) {
                List<?> pair = (List<?>) o;
                kept.add(new String[] {(String) pair.get(0), (String) pair.get(1)});
            }
        }
        kept.add(new String[] {document, summary});
        while (kept.size() > KEEP) kept.remove(0);
        List<Object> out = new ArrayList<Object>();
        for (String[] e : kept) {
            List<Object> pair = new ArrayList<Object>();
            pair.add(e[0]);
            pair.add(e[1]);
            out.add(pair);
        }
        File tmp = new File(store.root, EXAMPLES + ".tmp");
        PersonalStore.write(tmp, Json.write(out).getBytes("UTF-8"));
        PersonalStore.rename(tmp, file);
        return kept;
    }
}
