package org.spa.demo.core;

import org.spa.protocol.ClientException;
import org.spa.protocol.GatewayClient;
import org.spa.protocol.Messages;
import org.spa.protocol.PluginExecutor;
import org.spa.protocol.SessionResult;

/** Sessions through the real websocket client (GatewayClient). */
public final class GatewayConnector implements SessionRunner.Connector {
    @Override
    public SessionRunner.Connection connect(String url, PluginExecutor executor, Messages.Plugin plugin, double tau, String token) {
        final GatewayClient client = new GatewayClient(url, executor, plugin, tau, token);
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
