package org.spa.protocol;

import java.io.File;
import java.io.IOException;
import java.io.PrintStream;

/**
 * The Java device client on a host, for tests and comparisons with the Python
 * client. The plugin runs in {@link HostPluginExecutor} (no ExecuTorch here).
 *
 * <pre>
 * java -cp ... org.spa.protocol.Cli --gateway ws://127.0.0.1:PORT --plugin EXPORT_DIR --prompt-file FILE
 *      [--token T] [--window W] [--codec int8|int4|f32] [--outliers K] [--max-new-tokens N]
 *      [--temperature X] [--seed S] [--tau X] [--timeout SECONDS] [--compression auto|zstd|none|zstd,none|...]
 *      [--in-flight N] [--no-push-taps] [--no-cloud-projection] [--no-reconnect] [--head FILE] [--no-settle]
 * </pre>
 *
 * --in-flight, --no-push-taps, --no-cloud-projection: as `spa summarize`'s (side outputs awaiting their
 * verdict at once; do not upload the gate, which lets the gateway push taps with the steps where it
 * opens; keep the per-tap projections on the device: by default they are named by hash and uploaded
 * once, to a gateway that answers upload_needed).
 * A lost connection is resumed within the gateway's grace unless --no-reconnect.
 *
 * Settlement (docs/PROTOCOL.md section 6): greedy side tokens are proven on this device with the
 * backbone's output head, --head FILE, by default the one `spa export` leaves in the cache
 * ($SPA_CACHE_DIR, else $XDG_CACHE_HOME/spa, else ~/.cache/spa: heads/FINGERPRINT.safetensors);
 * without one (or with --no-settle) the gateway's verdicts decide every side token.
 *
 * --compression: the frame compressions offered in hello, preferred first (default auto: zstd and
 * none if zstd-jni loads here, else none; docs/PROTOCOL.md section 2); stats.compression is the choice.
 *
 * The prompt file holds the final prompt text (chat template applied), UTF-8.
 * Prints one JSON object (ASCII, non-ASCII escaped): tokens, text, sigma (and sigmas),
 * gate_p (the gate's p at each token's position, to check margins to tau), finish_reason, stats.
 * Defaults match `spa summarize`: window 4, 4 side outputs in flight, pushed taps, int8, 8 outliers, 64 new tokens,
 * greedy, seed 0, tau from the plugin config, token from $SPA_GATEWAY_TOKEN, the cloud-side projection, and
 * settlement where the output head is at hand.
 * Exit status: 0 on success, 1 when the session failed, 2 on bad arguments.
 */
public final class Cli {
    private Cli() {}

    public static void main(String[] args) {
        System.exit(run(args, System.out, System.err));
    }

    static int run(String[] args, PrintStream out, PrintStream err) {
        String gateway = "ws://127.0.0.1:8765", plugin = null, promptFile = null;
        String token = System.getenv("SPA_GATEWAY_TOKEN");
        Double tau = null;
        int timeout = 120;
        java.util.List<String> offer = null; // auto
        int inFlight = 4; // spa summarize's default
        boolean pushTaps = true, cloudProjection = true, reconnect = true, settle = true; // spa summarize's defaults
        String headFile = null; // default: the cache's
        Messages.Options options = new Messages.Options();
        options.window = 4;
        options.maxNewTokens = 64;
        String current = "";
        try {
            for (int i = 0; i < args.length; i++) {
                String a = args[i];
                if (a.equals("-h") || a.equals("--help")) {
                    out.println(usage());
                    return 0;
                }
                if (a.equals("--push-taps") || a.equals("--no-push-taps")) {
                    pushTaps = a.equals("--push-taps");
                    continue;
                }
                if (a.equals("--cloud-projection") || a.equals("--no-cloud-projection")) {
                    cloudProjection = a.equals("--cloud-projection");
                    continue;
                }
                if (a.equals("--no-reconnect")) {
                    reconnect = false;
                    continue;
                }
                if (a.equals("--no-settle")) {
                    settle = false;
                    continue;
                }
                if (i + 1 >= args.length) throw new IllegalArgumentException(a + " needs a value");
                String v = args[++i];
                current = a + " " + v;
                if (a.equals("--gateway")) gateway = v;
                else if (a.equals("--plugin")) plugin = v;
                else if (a.equals("--prompt-file")) promptFile = v;
                else if (a.equals("--token")) token = v;
                else if (a.equals("--window")) options.window = Integer.parseInt(v);
                else if (a.equals("--codec")) options.codec = v;
                else if (a.equals("--outliers")) options.outliers = Integer.parseInt(v);
                else if (a.equals("--max-new-tokens")) options.maxNewTokens = Integer.parseInt(v);
                else if (a.equals("--temperature")) options.temperature = Double.parseDouble(v);
                else if (a.equals("--seed")) options.seed = Long.parseLong(v);
                else if (a.equals("--tau")) tau = Double.parseDouble(v);
                else if (a.equals("--timeout")) timeout = Integer.parseInt(v);
                else if (a.equals("--in-flight")) inFlight = Integer.parseInt(v);
                else if (a.equals("--head")) headFile = v;
                else if (a.equals("--compression")) offer = v.equals("auto") ? null : java.util.Arrays.asList(v.split(","));
                else throw new IllegalArgumentException("unknown option " + a);
            }
            if (plugin == null || promptFile == null) throw new IllegalArgumentException("--plugin and --prompt-file are required");
            if (!ActivationCodec.isScheme(options.codec)) throw new IllegalArgumentException("--codec must be int8, int4 or f32");
            if (options.window < 0 || options.outliers < 0 || options.maxNewTokens < 1 || inFlight < 1) {
                throw new IllegalArgumentException("--window and --outliers must be >= 0, --max-new-tokens and --in-flight >= 1");
            }
        } catch (NumberFormatException e) {
            err.println("error: not a number: " + current);
            err.println(usage());
            return 2;
        } catch (IllegalArgumentException e) {
            err.println("error: " + e.getMessage());
            err.println(usage());
            return 2;
        }
        try {
            HostPluginExecutor executor = HostPluginExecutor.load(new File(plugin));
            String prompt = Files2.readUtf8(new File(promptFile));
            double threshold = tau != null ? tau : executor.config.tau;
            Messages.Plugin helloPlugin = executor.config.helloPlugin();
            OutputHead head = null;
            if (settle && options.temperature == 0) {
                File file = headFile != null ? new File(headFile) : OutputHead.cachedPath(helloPlugin.fingerprint);
                if (headFile != null || file.isFile()) head = OutputHead.load(file); // a named head must load
                else err.println("no output head at " + file + " (spa export writes it): the gateway's verdicts decide");
            }
            GatewayClient client = new GatewayClient(gateway, executor, helloPlugin, threshold, token)
                    .timeout(timeout).inFlight(inFlight).pushTaps(pushTaps).cloudProjection(cloudProjection)
                    .reconnect(reconnect).settle(head);
            if (offer != null) client.compression(offer);
            SessionResult result = client.run(prompt, options, null);
            out.println(Json.write(result.toMap()));
            return 0;
        } catch (IOException e) {
            err.println("error: " + e.getMessage());
            return 1;
        } catch (IllegalArgumentException e) { // an output head of another backbone
            err.println("error: " + e.getMessage());
            return 1;
        } catch (ClientException e) {
            err.println("error: " + e.getMessage());
            return 1;
        }
    }

    static String usage() {
        return "usage: java -cp CLASSPATH org.spa.protocol.Cli --gateway ws://HOST:PORT --plugin EXPORT_DIR "
                + "--prompt-file FILE [--token T] [--window W] [--codec int8|int4|f32] [--outliers K] "
                + "[--max-new-tokens N] [--temperature X] [--seed S] [--tau X] [--timeout SECONDS] [--compression auto|zstd|none|zstd,none] "
                + "[--in-flight N] [--no-push-taps] [--no-cloud-projection] [--no-reconnect] [--head FILE] [--no-settle]";
    }
}
