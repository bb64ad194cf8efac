package org.spa.demo.core;

import org.spa.protocol.ClientException;
import org.spa.protocol.GatewayClient;
import org.spa.protocol.Messages;
import org.spa.protocol.PluginExecutor;
import org.spa.protocol.SessionResult;

/**
 * Sessions through the real websocket client (GatewayClient), which resumes a session after a
 * lost connection. The defaults are `spa summarize`'s: 4 side outputs in flight and pushed taps
 * (the gate, 4.6 KB, is uploaded; the gateway learns every sigma anyway); the cloud-side
 * projection is opt-in here (~1.1 MB of the plugin's weights in every hello: this client does not
 * name them by hash, as spa summarize does), and settlement is not implemented.
 */
public final class GatewayConnector implements SessionRunner.Connector {
    private final int inFlight;
    private final boolean pushTaps, cloudProjection;

    /** spa summarize's defaults: 4 in flight, pushed taps, the cloud-side projection (named by hash). */
    public GatewayConnector() {
        this(4, true, true);
    }

    public GatewayConnector(int inFlight, boolean pushTaps, boolean cloudProjection) {
        this.inFlight = inFlight;
        this.pushTaps = pushTaps;
        this.cloudProjection = cloudProjection;
    }

    @Override
    public SessionRunner.Connection connect(String url, PluginExecutor executor, Messages.Plugin plugin, double tau, String token) {
        final GatewayClient client = new GatewayClient(url, executor, plugin, tau, token)
                .inFlight(inFlight).pushTaps(pushTaps).cloudProjection(cloudProjection);
        return new SessionRunner.Connection() {
            @Override
            public SessionResult run(String prompt, Messages.Options options, GatewayClient.Listener listener) throws ClientException {
                return client.run(prompt, options, listener);
            }

            @Override
            public void cancel() {
                client.cancel();
            }
        };
    }
}
