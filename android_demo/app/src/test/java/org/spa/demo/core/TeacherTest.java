package org.spa.demo.core;

import static org.junit.Assert.assertEquals;
import static org.junit.Assert.assertFalse;
import static org.junit.Assert.assertNotNull;
import static org.junit.Assert.assertNull;
import static org.junit.Assert.assertTrue;

import java.io.File;
import java.io.IOException;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Random;

import org.junit.After;
import org.junit.Before;
import org.junit.Rule;
import org.junit.Test;
import org.junit.rules.TemporaryFolder;
import org.spa.protocol.ClientException;
import org.spa.protocol.Files2;
import org.spa.protocol.HostPluginExecutor;
import org.spa.protocol.Json;
import org.spa.protocol.Safetensors;
import org.spa.protocol.TeachClient;
import org.spa.protocol.TeachSession;

/**
 * The Teach action on the JVM: the store of the learned plugin (atomic: a crash mid-write leaves
 * the previous plugin), and the flow (states, learning with a stand-in trainer, the new version
 * used by the next session's loader). Not shown here: ExecuTorch training on a phone.
 */
public class TeacherTest {
    @Rule
    public TemporaryFolder tmp = new TemporaryFolder();

    private File export;
    private float[][] taps;

    private static File repo() {
        String prop = System.getProperty("spa.repo");
        if (prop != null) return new File(prop);
        for (File d = new File(System.getProperty("user.dir")).getAbsoluteFile(); d != null; d = d.getParentFile()) {
            if (new File(d, "tests/vectors/plugin_vectors").isDirectory()) return d;
        }
        throw new IllegalStateException("cannot find the repository (set -Dspa.repo)");
    }

    /** An export as `spa export` writes it, from the shared plugin vectors: a weights file whose
     * layout (plugin-train.json) says where each tensor lies, and a stand-in program. */
    @Before
    public void export() throws IOException {
        File vectors = new File(repo(), "tests/vectors/plugin_vectors");
        export = tmp.newFolder("export");
        Map<String, Safetensors.Tensor> w = Safetensors.load(new File(vectors, "plugin.safetensors"));
        Map<String, Object> layout = new LinkedHashMap<String, Object>();
        List<Object> names = new ArrayList<Object>();
        int offset = 64; // the real file has a header first
        for (Map.Entry<String, Safetensors.Tensor> e : w.entrySet()) offset += 4 * e.getValue().data.length + 16;
        ByteBuffer ptd = ByteBuffer.allocate(offset).order(ByteOrder.LITTLE_ENDIAN);
        int at = 64;
        for (Map.Entry<String, Safetensors.Tensor> e : w.entrySet()) {
            Map<String, Object> entry = new LinkedHashMap<String, Object>();
            entry.put("offset", (long) at);
            entry.put("bytes", (long) (4 * e.getValue().data.length));
            List<Object> shape = new ArrayList<Object>();
            for (long d : e.getValue().shape) shape.add(d);
            entry.put("shape", shape);
            layout.put(e.getKey(), entry);
            names.add(e.getKey());
            ptd.position(at);
            for (float v : e.getValue().data) ptd.putFloat(v);
            at += 4 * e.getValue().data.length + 16;
        }
        Map<String, Object> info = new LinkedHashMap<String, Object>();
        info.put("format", 1L);
        info.put("layout", layout);
        info.put("weights", names);
        PersonalStore.write(new File(export, PersonalStore.JSON), Json.write(info).getBytes("UTF-8"));
        PersonalStore.write(new File(export, PersonalStore.PTD), ptd.array());
        PersonalStore.write(new File(export, PersonalStore.PTE), new byte[] {1, 2, 3});
        for (String n : new String[] {"config.json", "plugin.safetensors"}) {
            PersonalStore.write(new File(export, n), Files2.readBytes(new File(vectors, n)));
        }
        Random r = new Random(1);
        taps = new float[4][576];
        for (float[] row : taps) for (int i = 0; i < row.length; i++) row[i] = (float) r.nextGaussian() * 15;
    }

    @After
    public void noCrashes() {
        PersonalStore.renamer = null;
    }

    /** The stand-in trainer: W_out + 0.01, tau 0.42, three progress steps. */
    static final class NudgeTrainer implements PluginTrainer {
        int runs;

        @Override
        public Learned learn(File program, File weights, List<TeachSession.ExampleStates> examples, double tau,
                             Progress progress) throws IOException {
            runs++;
            Map<String, float[]> out = new LinkedHashMap<String, float[]>();
            float[] wOut = readWeight(weights, "side.w_out.weight");
            for (int i = 0; i < wOut.length; i++) wOut[i] += 0.01f;
            out.put("side.w_out.weight", wOut);
            for (int i = 1; i <= 3; i++) progress.step(i, 3);
            Map<String, Object> record = new LinkedHashMap<String, Object>();
            record.put("trainer", "stand-in");
            return new Learned(out, 0.42, record);
        }

        private float[] readWeight(File ptd, String name) throws IOException {
            PersonalStore store = new PersonalStore(ptd.getParentFile().getParentFile());
            return store.weights().get(name).clone();
        }
    }

    static final class FakeSource implements Teacher.StatesSource {
        final List<List<String[]>> asked = new ArrayList<List<String[]>>();

        @Override
        public List<TeachSession.ExampleStates> fetch(List<String[]> pairs, TeachClient.Progress progress) {
            asked.add(pairs);
            for (int i = 1; i <= pairs.size(); i++) progress.fetched(i, pairs.size());
            return new ArrayList<TeachSession.ExampleStates>();
        }
    }

    static final class Recorder implements Teacher.Ui {
        final List<String> events = new ArrayList<String>();
        File version;
        String failure;

        @Override
        public void progress(String stage, int done, int total) {
            events.add(stage + " " + done + "/" + total);
        }

        @Override
        public void learned(File v, double tau) {
            version = v;
            events.add("learned tau " + tau);
        }

        @Override
        public void failed(String message, Throwable cause) {
            failure = message;
        }
    }

    @Test
    public void teachingWritesANewVersionThatTheNextSessionLoads() throws Exception {
        PersonalStore store = PersonalStore.create(export, tmp.newFolder("store"));
        float[] before = HostPluginExecutor.load(store.current()).side(taps);
        FakeSource source = new FakeSource();
        Recorder ui = new Recorder();
        File version = new Teacher(store, source, new NudgeTrainer()).teach("A long document about gates.",
                "My own summary.", ui);
        assertNull(ui.failure);
        assertEquals(store.current(), version);
        assertEquals(Arrays.asList("states from the gateway 0/1", "states from the gateway 1/1", "learning 1/3",
                "learning 2/3", "learning 3/3", "learned tau 0.42"), ui.events);
        // the prompt is the plugin's template around the document; the summary is the reader's
        String[] pair = source.asked.get(0).get(0);
        assertTrue(pair[0].contains("A long document about gates.") && pair[1].equals("My own summary."));
        // what the next session loads (HostPluginExecutor on the current version) is the new plugin
        float[] after = HostPluginExecutor.load(store.current()).side(taps);
        assertFalse(Arrays.equals(before, after));
        assertEquals(0.42, store.config().tau, 0);
        Map<String, Object> config = Json.parseObject(Files2.readUtf8(new File(version, "config.json")));
        assertEquals(1, ((List<?>) ((Map<?, ?>) config.get("training")).get("personalized")).size());
        // a second Teach learns from both examples, and only the current and previous versions stay
        new Teacher(store, source, new NudgeTrainer()).teach("Another document.", "Another summary.", new Recorder());
        assertEquals(2, source.asked.get(1).size());
        new Teacher(store, source, new NudgeTrainer()).teach("A third.", "Third.", new Recorder());
        int versions = 0;
        for (String n : store.root.list()) versions += n.matches("v[0-9]{6}") ? 1 : 0;
        assertEquals(2, versions);
    }

    @Test
    public void aCrashMidWriteLeavesThePreviousPlugin() throws Exception {
        PersonalStore store = PersonalStore.create(export, tmp.newFolder("store"));
        File old = store.current();
        float[] before = HostPluginExecutor.load(old).side(taps);
        for (final String at : new String[] {"version", "pointer"}) {
            PersonalStore.renamer = new PersonalStore.Renamer() {
                @Override
                public void check(File from, File to) throws IOException {
                    boolean pointer = to.getName().equals(PersonalStore.CURRENT);
                    if (pointer == at.equals("pointer") && !to.getName().equals(Teacher.EXAMPLES)) {
                        throw new IOException("power lost at the " + at + " rename");
                    }
                }
            };
            Recorder ui = new Recorder();
            assertNull(new Teacher(store, new FakeSource(), new NudgeTrainer()).teach("Doc.", "Summary.", ui));
            assertTrue(ui.failure, ui.failure.contains("power lost"));
            PersonalStore.renamer = null;
            assertEquals(old, store.current());
            assertTrue(Arrays.equals(before, HostPluginExecutor.load(store.current()).side(taps)));
        }
        assertNotNull(new Teacher(store, new FakeSource(), new NudgeTrainer()).teach("Doc.", "Summary.", new Recorder()));
        for (String n : store.root.list()) assertFalse(n, n.startsWith(".tmp-"));
    }

    @Test
    public void aFailedFetchOrTrainingChangesNothing() throws Exception {
        PersonalStore store = PersonalStore.create(export, tmp.newFolder("store"));
        File old = store.current();
        Recorder ui = new Recorder();
        Teacher.StatesSource down = new Teacher.StatesSource() {
            @Override
            public List<TeachSession.ExampleStates> fetch(List<String[]> pairs, TeachClient.Progress progress)
                    throws ClientException {
                throw new ClientException("the gateway does not serve teaching states (it predates on-device learning)");
            }
        };
        assertNull(new Teacher(store, down, new NudgeTrainer()).teach("Doc.", "Summary.", ui));
        assertTrue(ui.failure.contains("predates on-device learning"));
        assertEquals(old, store.current());
        Recorder empty = new Recorder();
        assertNull(new Teacher(store, new FakeSource(), new NudgeTrainer()).teach("Doc.", "  ", empty));
        assertTrue(empty.failure.contains("corrected summary"));
    }
}
