package org.spa.demo;

import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;

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

import org.spa.protocol.ClientException;
import org.spa.protocol.Commit;
import org.spa.protocol.Files2;
import org.spa.protocol.GatewayClient;
import org.spa.protocol.Messages;
import org.spa.protocol.Prompts;
import org.spa.protocol.SessionResult;

/**
 * Paste or share a document, pick the reader's plugin (.pte), name the gateway,
 * and watch the personalized summary stream in: the gate and the side network
 * run here through ExecuTorch, the backbone runs in the gateway. Tokens the side
 * network decided are highlighted. Built in code (no XML layouts) so that the
 * sources compile with javac alone (android_demo/scripts/compile_app.sh).
 */
public class MainActivity extends Activity {
    static final String TAG = "SPA";
    private static final int PICK_PTE = 1;

    private EditText document, ptePath, gateway, token, window, tau;
    private Button run, pick;
    private TextView status, stats;
    private SummaryView summary;
    private SharedPreferences prefs;

    private ExecuTorchPluginExecutor executor; // kept between runs; touched only by the session thread
    private String loadedPath; // the .pte `executor` was loaded from
    private volatile GatewayClient client; // the running session, for Stop
    private Thread session;

    @Override
    protected void onCreate(Bundle state) {
        super.onCreate(state);
        prefs = getSharedPreferences("spa", MODE_PRIVATE);
        LinearLayout col = new LinearLayout(this);
        col.setOrientation(LinearLayout.VERTICAL);
        int pad = (int) (12 * getResources().getDisplayMetrics().density);
        col.setPadding(pad, pad, pad, pad);

        document = field(col, "Document (paste, or share text into the app)", "", InputType.TYPE_TEXT_FLAG_MULTI_LINE);
        document.setMinLines(4);
        document.setMaxLines(10);
        ptePath = field(col, "Reader's plugin (.pte)", prefs.getString("pte", PluginFiles.DEFAULT_PTE), 0);
        pick = new Button(this);
        pick.setText("Pick a .pte from storage…");
        pick.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                Intent i = new Intent(Intent.ACTION_OPEN_DOCUMENT).addCategory(Intent.CATEGORY_OPENABLE).setType("*/*");
                startActivityForResult(i, PICK_PTE);
            }
        });
        col.addView(pick);
        gateway = field(col, "Gateway URL (ws://127.0.0.1:8765 with `adb reverse tcp:8765 tcp:8765`)",
                prefs.getString("gateway", "ws://127.0.0.1:8765"), InputType.TYPE_TEXT_VARIATION_URI);
        token = field(col, "Auth token (empty if none)", prefs.getString("token", ""), InputType.TYPE_TEXT_VARIATION_PASSWORD);
        window = field(col, "Draft-ahead window W (0 = lock-step)", prefs.getString("window", "4"), InputType.TYPE_CLASS_NUMBER);
        tau = field(col, "Gate threshold tau (empty: the plugin's)", prefs.getString("tau", ""),
                InputType.TYPE_CLASS_NUMBER | InputType.TYPE_NUMBER_FLAG_DECIMAL);

        run = new Button(this);
        run.setText("Summarize");
        run.setOnClickListener(new View.OnClickListener() {
            @Override
            public void onClick(View v) {
                if (session != null && session.isAlive()) stop();
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

        ScrollView scroll = new ScrollView(this);
        scroll.addView(col);
        setContentView(scroll);
        receiveShared(getIntent());
    }

    @Override
    protected void onNewIntent(Intent intent) {
        super.onNewIntent(intent);
        receiveShared(intent);
    }

    /** ACTION_SEND: shared text, or a shared text file. */
    private void receiveShared(Intent intent) {
        if (intent == null || !Intent.ACTION_SEND.equals(intent.getAction())) return;
        CharSequence text = intent.getCharSequenceExtra(Intent.EXTRA_TEXT);
        if (text != null) {
            document.setText(text);
            return;
        }
        Uri uri = intent.getParcelableExtra(Intent.EXTRA_STREAM);
        if (uri == null) return;
        try {
            InputStream in = getContentResolver().openInputStream(uri);
            if (in == null) throw new IOException("cannot open " + uri);
            try {
                document.setText(new String(Files2.readAll(in), StandardCharsets.UTF_8));
            } finally {
                in.close();
            }
        } catch (IOException e) {
            status.setText("Cannot read the shared file: " + e.getMessage());
        }
    }

    @Override
    protected void onActivityResult(int requestCode, int resultCode, Intent data) {
        super.onActivityResult(requestCode, resultCode, data);
        if (requestCode != PICK_PTE || resultCode != RESULT_OK || data == null || data.getData() == null) return;
        try {
            ptePath.setText(PluginFiles.importPicked(this, data.getData()));
        } catch (IOException e) {
            status.setText("Cannot import the picked file: " + e.getMessage());
        }
    }

    private void start() {
        final String doc = document.getText().toString();
        final String pte = ptePath.getText().toString().trim();
        final String url = gateway.getText().toString().trim();
        final String auth = token.getText().toString();
        final Messages.Options options = new Messages.Options();
        options.maxNewTokens = 64;
        final Double tauOverride;
        try {
            options.window = Integer.parseInt(window.getText().toString().trim());
            String t = tau.getText().toString().trim();
            tauOverride = t.isEmpty() ? null : Double.valueOf(t);
        } catch (NumberFormatException e) {
            status.setText("Window must be an integer and tau a number.");
            return;
        }
        if (doc.trim().isEmpty()) {
            status.setText("Paste or share a document first.");
            return;
        }
        prefs.edit().putString("pte", pte).putString("gateway", url).putString("token", auth)
                .putString("window", window.getText().toString()).putString("tau", tau.getText().toString()).apply();
        summary.clear();
        stats.setText("");
        status.setText("Loading the plugin…");
        run.setText("Stop");
        session = new Thread(new Runnable() {
            @Override
            public void run() {
                runSession(doc, pte, url, auth, options, tauOverride);
            }
        }, "spa-session");
        session.start();
    }

    private void stop() {
        GatewayClient c = client;
        if (c != null) c.cancel();
    }

    /** On the session thread: load the plugin, run the protocol, stream commits to the screen. */
    private void runSession(String doc, String pte, String url, String auth, Messages.Options options, Double tauOverride) {
        try {
            if (executor == null || !pte.equals(loadedPath)) {
                if (executor != null) executor.close();
                executor = null;
                executor = ExecuTorchPluginExecutor.load(pte);
                loadedPath = pte;
            }
            String warning = PluginFiles.checkSidecarConfig(pte, executor.config);
            double threshold = tauOverride != null ? tauOverride : executor.config.tau;
            post("Connecting… (plugin " + executor.config.contentHash + ", tau " + threshold
                    + (warning == null ? "" : "; " + warning) + ")");
            client = new GatewayClient(url, executor, executor.config.helloPlugin(), threshold, auth);
            SessionResult result = client.run(Prompts.forDocument(executor.config, doc), options, new GatewayClient.Listener() {
                @Override
                public void onCommit(final Commit commit, final String piece) {
                    runOnUiThread(new Runnable() {
                        @Override
                        public void run() {
                            summary.append(piece, commit.sigma);
                        }
                    });
                }
            });
            final String line = StatsLine.format(result.stats);
            final String reason = result.finishReason;
            runOnUiThread(new Runnable() {
                @Override
                public void run() {
                    status.setText("Done (" + reason + "). Highlighted: tokens chosen with the side network.");
                    stats.setText(line);
                }
            });
        } catch (ClientException e) {
            post(e.getMessage());
        } catch (RuntimeException e) { // ExecuTorch load/execute failures, a bad config
            Log.e(TAG, "session failed", e);
            post("Failed: " + e);
        } finally {
            client = null;
            runOnUiThread(new Runnable() {
                @Override
                public void run() {
                    run.setText("Summarize");
                }
            });
        }
    }

    private void post(final String message) {
        runOnUiThread(new Runnable() {
            @Override
            public void run() {
                status.setText(message);
            }
        });
    }

    private EditText field(LinearLayout parent, String label, String value, int inputType) {
        TextView l = new TextView(this);
        l.setText(label);
        parent.addView(l);
        EditText e = new EditText(this);
        e.setText(value);
        e.setInputType(InputType.TYPE_CLASS_TEXT | inputType);
        if ((inputType & InputType.TYPE_CLASS_NUMBER) != 0) e.setInputType(inputType);
        parent.addView(e);
        return e;
    }

    @Override
    protected void onDestroy() {
        stop();
        if (session != null) {
            try {
                session.join(2000); // the executor is only closed once no session uses it
            } catch (InterruptedException ignored) {
                Thread.currentThread().interrupt();
            }
        }
        if (executor != null && (session == null || !session.isAlive())) executor.close();
        super.onDestroy();
    }
}
