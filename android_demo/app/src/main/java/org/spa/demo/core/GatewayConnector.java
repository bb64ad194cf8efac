package org.spa.demo.core;

import java.io.File;
import java.io.IOException;

import org.spa.protocol.ClientException;
import org.spa.protocol.GatewayClient;
import org.spa.protocol.Messages;
import org.spa.protocol.OutputHead;
import org.spa.protocol.PluginExecutor;
import org.spa.protocol.SessionResult;

/**
 * Sessions through the real websocket client (GatewayClient), which resumes a session after a
 * lost connection. The defaults are `spa summarize`'s: 4 side outputs in flight, pushed taps (the
 * gate, 4.6 KB, is uploaded; the gateway learns every sigma anyway), the cloud-side projection
 * (named by hash, uploaded once per gateway), and settlement wherever the backbone's output head
 * is on the phone: {@link #HEADS}/FINGERPRINT.safetensors, the file `spa export` leaves in
 * ~/.cache/spa/heads (pushed with adb; android_demo/README.md). Without it the gateway's verdicts
 * decide every side token, as before.
 */
public final class GatewayConnector implements SessionRunner.Connector {
    /** Where the app looks for output heads (one per backbone, shared by every plugin of it). */
    public static final File HEADS = new File("/data/local/tmp/spa/heads");

    private final int inFlight;
    private final boolean pushTaps, cloudProjection;
    private final File heads; // null: never settle
    private OutputHead head; // the last head loaded (memory-mapped), kept across sessions

    /** spa summarize's defaults: 4 in flight, pushed taps, the cloud-side projection, settlement. */
    public GatewayConnector() {
        this(4, true, true, HEADS);
    }

    /** @param heads the folder of output heads; null: do not settle */
    public GatewayConnector(int inFlight, boolean pushTaps, boolean cloudProjection, File heads) {
        this.inFlight = inFlight;
        this.pushTaps = pushTaps;
        this.cloudProjection = cloudProjection;
        this.heads = heads;
    }

    @Override
    public SessionRunner.Connection connect(String url, PluginExecutor executor, final Messages.Plugin plugin, double tau,
                                            String token) {
        final GatewayClient client = new GatewayClient(url, executor, plugin, tau, token)
                .inFlight(inFlight).pushTaps(pushTaps).cloudProjection(cloudProjection);
        return new SessionRunner.Connection() {
            @Override
            public SessionResult run(String prompt, Messages.Options options, GatewayClient.Listener listener) throws ClientException {
                client.settle(headFor(plugin.fingerprint));
                return client.run(prompt, options, listener);
            }

            @Override
            public void cancel() {
                client.cancel();
            }
        };
    }

    /** The output head of this backbone if the phone has it (loaded once), else null. */
    synchronized OutputHead headFor(String fingerprint) throws ClientException {
        if (heads == null) return null;
        if (head != null && head.fingerprint.equals(fingerprint)) return head;
        File file = new File(heads, OutputHead.cachedPath(fingerprint).getName());
        if (!file.isFile()) return null;
        try {
            head = OutputHead.load(file);
        } catch (IOException e) {
            throw new ClientException("cannot use the output head " + file + " for settlement: " + e.getMessage());
        }
        if (!head.fingerprint.equals(fingerprint)) {
            throw new ClientException(file + " holds the output head of backbone '" + head.fingerprint + "', not '"
                    + fingerprint + "'");
        }
        return head;
    }
}
