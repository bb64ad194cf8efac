package org.spa.demo.core;

import java.io.File;
import java.io.IOException;

import org.spa.protocol.PluginConfig;

/** The config.json beside a .pte, if any, must describe the plugin the .pte embeds. */
public final class Sidecar {
    private Sidecar() {}

    /** A warning, or null when there is no sidecar or it names the same content hash. */
    public static String check(String ptePath, PluginConfig embedded) {
        if (new File(ptePath).isDirectory()) return null; // a personal plugin store: its version holds the config
        File sidecar = new File(new File(ptePath).getAbsoluteFile().getParentFile(), "config.json");
        if (!sidecar.isFile()) return null;
        try {
            PluginConfig beside = PluginConfig.load(sidecar);
            if (!beside.contentHash.equals(embedded.contentHash)) {
                return "config.json beside the .pte is for plugin " + beside.contentHash
                        + ", the .pte holds " + embedded.contentHash + "; using the .pte's";
            }
            return null;
        } catch (IOException | RuntimeException e) {
            return "ignoring " + sidecar + ": " + e.getMessage();
        }
    }
}
