package org.spa.demo;

import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;

import android.app.Activity;
import android.content.Intent;
import android.content.SharedPreferences;
import android.net.Uri;
import android.os.Bundle;
import android.text.InputType;
import android.util.Log;
import android.view.View;
import android.widget.Button;
import android.widget.EditText;
import android.widget.LinearLayout;
import android.widget.ScrollView;
import android.widget.TextView;

import org.spa.demo.core.BoundedRead;
import org.spa.demo.core.Failures;
import org.spa.demo.core.GatewayConnector;
import org.spa.demo.core.PersonalPlugins;
import org.spa.demo.core.PersonalStore;
import org.spa.demo.core.SessionRunner;
import org.spa.demo.core.SharedContent;
import org.spa.demo.core.Teacher;
import org.spa.protocol.ClientException;
import org.spa.protocol.PluginConfig;
import org.spa.protocol.SessionResult;
import org.spa.protocol.TeachClient;
import org.spa.protocol.TeachSession;

/**
 * Paste or share a document, pick the reader's plugin (.pte), name the gateway,
 * and watch the personalized summary stream in: the gate and the side network
 * run here through ExecuTorch, the backbone runs in the gateway. Tokens the side
 * network decided are highlighted. Built in code (no XML layouts) so that the
 * sources compile with javac alone (android_demo/scripts/compile_app.sh).
 *
 * <p>The session lives in a process-wide {@link SessionRunner}, not in the activity: a rotation
 * (the manifest also keeps the activity through configuration changes) or any other re-creation
 * re-attaches the screen to the running summary instead of cancelling it or starting a second
 * session with a second Module. Input fields have fixed ids, so their text survives re-creation.
 * Shared and picked files are read on a background thread, with a size limit.
 */
public class MainActivity extends Activity {
    static final String TAG = "SPA";
    private static final int PICK_PTE = 1;
    // fixed view ids: Android saves an EditText's text across re-creation only when it has an id
    private static final int ID_DOCUMENT = 0x5a01, ID_PTE = 0x5a02, ID_GATEWAY = 0x5a03, ID_TOKEN = 0x5a04,
            ID_WINDOW = 0x5a05, ID_TAU = 0x5a06, ID_TEACH = 0x5a07;
    /** Teach runs here, one at a time, off the main thread (minutes of training on a phone CPU). */
    private static final ExecutorService TEACH = Executors.newSingleThreadExecutor();

    /** The reader's sessions, shared by every instance of this activity in the process. */
    private static SessionRunner runner;
    /** Reads of shared and picked content (never on the main thread). */
    private static final ExecutorService IO = Executors.newSingleThreadExecutor();

    private EditText document, ptePath, gateway, token, window, tau, corrected;
    private Button run, teach;
    private TextView status, stats, teachStatus;
    private SummaryView summary;
    private SharedPreferences prefs;

    static synchronized SessionRunner runner() {
        if (runner == null) {
            runner = new SessionRunner(new SessionRunner.PluginLoader() {
                @Override
                public SessionRunner.Plugin load(String path) throws Exception {
                    // the plugin the phone learned (Teach) is a store: its current version, in Java
                    if (PersonalPlugins.isStore(path)) return PersonalPlugins.load(path);
                    return ExecuTorchPluginExecutor.load(path);
                }
            }, new GatewayConnector());
        }
        return runner;
    }

    private static synchronized void dropRunner() {
        if (runner != null) runner.release(); // stops a running session; frees the plugin
        runner = null;
    }

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        NativeRuntime.check(this); // a 16 KB page phone with 4 KB-aligned libraries: one line when a plugin loads
        prefs = getSharedPreferences("spa", MODE_PRIVATE);
        // Creates Android/data/org.spa.demo/files, where `adb push` can put plugins (README).
        getExternalFilesDir(null);
        LinearLayout col = new LinearLayout(this);
        col.setOrientation(LinearLayout.VERTICAL);
        int pad = (int) (12 * getResources().getDisplayMetrics().density);
        col.setPadding(pad, pad, pad, pad);

        document = field(col, ID_DOCUMENT, "Document (paste, or share text or a text file into the app)", "",
                InputType.TYPE_TEXT_FLAG_MULTI_LINE);
        document.setMinLines(4);
        document.setMaxLines(10);
        ptePath = field(col, ID_PTE, "Reader's plugin (.pte)", prefs.getString("pte", PluginFiles.DEFAULT_PTE), 0);
        Button pick = new Button(this);
        pick.setText("Pick a .pte from storage…");
        pick.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                Intent i = new Intent(Intent.ACTION_OPEN_DOCUMENT).addCategory(Intent.CATEGORY_OPENABLE).setType("*/*");
                startActivityForResult(i, PICK_PTE);
            }
        });
        col.addView(pick);
        gateway = field(col, ID_GATEWAY, "Gateway URL (ws://127.0.0.1:8765 with `adb reverse tcp:8765 tcp:8765`)",
                prefs.getString("gateway", "ws://127.0.0.1:8765"), InputType.TYPE_TEXT_VARIATION_URI);
        token = field(col, ID_TOKEN, "Auth token (empty if none)", prefs.getString("token", ""),
                InputType.TYPE_TEXT_VARIATION_PASSWORD);
        window = field(col, ID_WINDOW, "Draft-ahead window W (0 = lock-step)", prefs.getString("window", "4"),
                InputType.TYPE_CLASS_NUMBER);
        tau = field(col, ID_TAU, "Gate threshold tau (empty: the plugin's)", prefs.getString("tau", ""),
                InputType.TYPE_CLASS_NUMBER | InputType.TYPE_NUMBER_FLAG_DECIMAL);

        run = new Button(this);
        run.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                if (runner().running()) runner().stop();
                else start();
            }
        });
        col.addView(run);
        status = new TextView(this);
        col.addView(status);
        TextView out = new TextView(this);
        out.setTextSize(18);
        out.setTextIsSelectable(true);
        col.addView(out);
        summary = new SummaryView(out);
        stats = new TextView(this);
        stats.setTextSize(12);
        col.addView(stats);
        corrected = field(col, ID_TEACH, "Your summary: edit the one above as you would have written it, then Teach "
                + "(the phone learns from it; the next summary uses what it learned)", "",
                InputType.TYPE_TEXT_FLAG_MULTI_LINE);
        teach = new Button(this);
        teach.setText("Teach");
        teach.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                teach();
            }
        });
        col.addView(teach);
        teachStatus = new TextView(this);
        col.addView(teachStatus);

        ScrollView scroll = new ScrollView(this);
        scroll.addView(col);
        setContentView(scroll);
        run.setText(runner().running() ? "Stop" : "Summarize");
        runner().attach(screen); // replays the summary so far after a re-creation
        if (state == null) receiveShared(getIntent()); // a re-created activity keeps its text instead
    }

    /** The runner's view of this screen: everything is posted to the UI thread. */
    private final SessionRunner.Ui screen = new SessionRunner.Ui() {
        @Override
        public void status(final String message) {
            post(new Runnable() {
                @Override
                public void run() {
                    status.setText(message);
                }
            });
        }

        @Override
        public void commit(final String piece, final boolean sigma) {
            post(new Runnable() {
                @Override
                public void run() {
                    summary.append(piece, sigma);
                }
            });
        }

        @Override
        public void done(final SessionResult result) {
            final String line = StatsLine.format(result.stats);
            post(new Runnable() {
                @Override
                public void run() {
                    stats.setText(line);
                    corrected.setText(result.text); // the reader corrects it, then Teach
                }
            });
        }

        @Override
        public void failed(String message, Throwable cause) {
            Log.e(TAG, "session failed: " + message, cause);
        }

        @Override
        public void ended() {
            post(new Runnable() {
                @Override
                public void run() {
                    run.setText("Summarize");
                }
            });
        }
    };

    private void post(Runnable r) {
        runOnUiThread(r);
    }

    @Override
    protected void onNewIntent(Intent intent) {
        super.onNewIntent(intent);
        receiveShared(intent);
    }

    /** ACTION_SEND: a shared file (read off the main thread, bounded), else the shared text. */
    private void receiveShared(Intent intent) {
        if (intent == null || !Intent.ACTION_SEND.equals(intent.getAction())) return;
        final Uri uri = intent.getParcelableExtra(Intent.EXTRA_STREAM);
        CharSequence text = intent.getCharSequenceExtra(Intent.EXTRA_TEXT);
        switch (SharedContent.choose(uri != null, text)) {
            case TEXT:
                document.setText(text);
                return;
            case NONE:
                return;
            case STREAM:
                break;
        }
        status.setText("Reading the shared file…");
        IO.execute(new Runnable() {
            @Override
            public void run() {
                String result;
                boolean ok;
                try {
                    InputStream in = getContentResolver().openInputStream(uri);
                    if (in == null) throw new IOException("cannot open " + uri);
                    try {
                        result = new String(BoundedRead.readAll(in, BoundedRead.MAX_DOCUMENT_BYTES), StandardCharsets.UTF_8);
                    } finally {
                        in.close();
                    }
                    ok = true;
                } catch (IOException | RuntimeException e) {
                    result = "Cannot read the shared file: " + e.getMessage();
                    ok = false;
                }
                final String r = result;
                final boolean fine = ok;
                post(new Runnable() {
                    @Override
                    public void run() {
                        if (isDestroyed()) return;
                        if (fine) {
                            document.setText(r);
                            status.setText("");
                        } else {
                            status.setText(r);
                        }
                    }
                });
            }
        });
    }

    @Override
    protected void onActivityResult(int requestCode, int resultCode, Intent data) {
        super.onActivityResult(requestCode, resultCode, data);
        if (requestCode != PICK_PTE || resultCode != RESULT_OK || data == null || data.getData() == null) return;
        final Uri uri = data.getData();
        status.setText("Copying the picked plugin…");
        IO.execute(new Runnable() {
            @Override
            public void run() {
                String path = null, error = null;
                try {
                    path = PluginFiles.importPicked(MainActivity.this, uri);
                } catch (IOException | RuntimeException e) {
                    error = "Cannot import the picked file: " + e.getMessage();
                }
                final String p = path, err = error;
                post(new Runnable() {
                    @Override
                    public void run() {
                        if (isDestroyed()) return;
                        if (p != null) {
                            ptePath.setText(p);
                            status.setText("Plugin copied to " + p);
                        } else {
                            status.setText(err);
                        }
                    }
                });
            }
        });
    }

    private void start() {
        SessionRunner.Request r = new SessionRunner.Request();
        r.document = document.getText().toString();
        r.ptePath = ptePath.getText().toString().trim();
        r.url = gateway.getText().toString().trim();
        r.token = token.getText().toString();
        r.options.maxNewTokens = 64;
        try {
            r.options.window = Integer.parseInt(window.getText().toString().trim());
            String t = tau.getText().toString().trim();
            r.tau = t.isEmpty() ? null : Double.valueOf(t);
        } catch (NumberFormatException e) {
            status.setText("Window must be an integer and tau a number.");
            return;
        }
        if (r.document.trim().isEmpty()) {
            status.setText("Paste or share a document first.");
            return;
        }
        prefs.edit().putString("pte", r.ptePath).putString("gateway", r.url).putString("token", r.token)
                .putString("window", window.getText().toString()).putString("tau", tau.getText().toString()).apply();
        summary.clear();
        stats.setText("");
        try {
            if (runner().start(r)) run.setText("Stop");
        } catch (Throwable t) { // e.g. no thread could be started
            status.setText("Failed: " + Failures.describe(t));
        }
    }

    /**
     * Teach: the phone learns from the reader's corrected summary in the background (states from
     * the gateway, ExecuTorch training here, the new plugin written atomically beside the export
     * in `personal/`), then points the plugin field at it: the next summary uses it.
     */
    private void teach() {
        final String doc = document.getText().toString(), mine = corrected.getText().toString();
        final String path = ptePath.getText().toString().trim(), url = gateway.getText().toString().trim();
        final String tok = token.getText().toString();
        teach.setEnabled(false);
        teachStatus.setText("Teaching…");
        TEACH.execute(new Runnable() {
            @Override
            public void run() {
                String message;
                File learnedStore = null;
                try {
                    File exportDir = PersonalPlugins.isStore(path) ? new File(path).getParentFile()
                            : new File(path).getAbsoluteFile().getParentFile();
                    File root = PersonalPlugins.isStore(path) ? new File(path) : new File(exportDir, "personal");
                    PersonalStore store = new File(root, PersonalStore.CURRENT).isFile() ? new PersonalStore(root)
                            : PersonalStore.create(exportDir, root);
                    final PluginConfig config = store.config();
                    Teacher.StatesSource source = new Teacher.StatesSource() {
                        @Override
                        public java.util.List<TeachSession.ExampleStates> fetch(java.util.List<String[]> pairs,
                                                                               TeachClient.Progress progress)
                                throws ClientException {
                            TeachSession s = new TeachSession(config.helloPlugin(), tok, "int8", 8, config.gateMargin,
                                    config.hiddenSize, config.hiddenSize, null);
                            return new TeachClient(url, s).fetch(pairs, progress);
                        }
                    };
                    File head = new File(exportDir, "head.safetensors");
                    File version = new Teacher(store, source, new ExecuTorchTrainer(head, 5)).teach(doc, mine, teachUi);
                    if (version != null) learnedStore = store.root;
                    message = version == null ? null : "Learned (" + version.getName() + "); the next summary uses it.";
                } catch (IOException | RuntimeException e) {
                    message = "Teach failed: " + Failures.describe(e);
                }
                final String m = message;
                final File s = learnedStore;
                post(new Runnable() {
                    @Override
                    public void run() {
                        if (isDestroyed()) return;
                        teach.setEnabled(true);
                        if (m != null) teachStatus.setText(m);
                        if (s != null) {
                            ptePath.setText(s.getPath());
                            prefs.edit().putString("pte", s.getPath()).apply();
                        }
                    }
                });
            }
        });
    }

    private final Teacher.Ui teachUi = new Teacher.Ui() {
        @Override
        public void progress(final String stage, final int done, final int total) {
            post(new Runnable() {
                @Override
                public void run() {
                    teachStatus.setText("Teaching: " + stage + " " + done + "/" + total);
                }
            });
        }

        @Override
        public void learned(File version, double tau) {}

        @Override
        public void failed(final String message, Throwable cause) {
            Log.e(TAG, message, cause);
            post(new Runnable() {
                @Override
                public void run() {
                    teachStatus.setText(message + " (the previous plugin is kept)");
                }
            });
        }
    };

    private EditText field(LinearLayout parent, int id, String label, String value, int inputType) {
        TextView l = new TextView(this);
        l.setText(label);
        parent.addView(l);
        EditText e = new EditText(this);
        e.setId(id);
        e.setText(value);
        e.setInputType(InputType.TYPE_CLASS_TEXT | inputType);
        if ((inputType & InputType.TYPE_CLASS_NUMBER) != 0) e.setInputType(inputType);
        parent.addView(e);
        return e;
    }

    @Override
    protected void onDestroy() {
        synchronized (MainActivity.class) {
            if (runner != null) runner.detach(screen);
        }
        if (isFinishing()) dropRunner(); // leaving the app: stop the session, free the plugin
        super.onDestroy();
    }
}
