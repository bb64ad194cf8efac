"""Parsers and handlers of `spa bench link|device|bytes|load|model` (wired into cli/main.py's `bench` subcommand).

Importing this module is cheap (argparse only); handlers import their benchmark modules lazily.
"""

import json
import sys
from pathlib import Path

DEFAULT_DOCS = ["aclsum:test:0", "aclsum:test:1", "aclsum:test:2"]
LINK_DOCS = [f"aclsum:test:{i}" for i in range(10)]  # enough tokens to tell 0.87 from 0.95


def progress_log(as_json: bool):
    """Progress lines: on stderr when stdout carries the JSON result, else on stdout."""
    stream = sys.stderr if as_json else sys.stdout
    return lambda msg: print(msg, file=stream, flush=True)


def write_result(result: dict, out: Path, as_json: bool, table) -> None:
    """Write the result as JSON to `out`, then print it: JSON, or `table(result)` and where it went."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
        print(f"written: {out}")


def _saved_link_result(path: Path) -> dict:
    """A saved `spa bench link` result, with its goals worked out again by this version."""
    from benchmarks.linkbench import goals
    from spa.errors import SpaError

    try:
        result = json.loads(path.read_text())
        result["goals"] = goals(result)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpaError(f"{path} is not a readable spa bench link result: {exc!r}") from None
    return result


def cmd_bench_link(args) -> int:
    from benchmarks.linkbench import ROWS, format_result, plot_result, run_link_bench

    log = progress_log(args.json)
    results = []
    for profile in args.report or args.profile:
        if args.report:  # nothing runs: a saved result, reported again
            result = _saved_link_result(profile)
            profile = result["profile"]["name"]
        else:
            result = run_link_bench(profile, plugin=args.plugin, docs=args.docs, max_new_tokens=args.max_new_tokens,
                                    per_layer_tokens=args.per_layer_tokens, window=args.window, codec=args.codec,
                                    rows=args.rows or ROWS, link_mode=args.link, device_variant=args.device_variant,
                                    workdir=args.workdir, pin=not args.no_pin, tau=args.tau,
                                    skip_cost=args.skip_cost, repeats=args.repeats, in_flight=args.in_flight,
                                    device_client=args.device_client, log=log)
            result["command"] = "spa " + " ".join(sys.argv[1:])
        stem = f"link-{profile}" + ("-java" if result.get("device_client") == "java" else "")
        out = args.out / f"{stem}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        png = plot_result(result, args.out / f"{stem}.png")
        txt = args.out / f"{stem}.txt"
        txt.write_text(format_result(result) + "\n")
        results.append(result)
        if not args.json:
            print()
            print(format_result(result))
            print(f"written: {out}, {txt}, {png}", flush=True)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    return 0


def cmd_bench_device(args) -> int:
    from benchmarks.devicebench import format_table, run_adb, run_local

    log = progress_log(args.json)
    if args.learning:  # on-device learning: time, memory, bytes per example, Rouge-L against the workstation's
        from benchmarks.learnbench import format_learning, run_learning

        result = run_learning(args.workdir / "learning", person=args.person, n=args.examples, tests=args.tests, log=log)
        write_result(result, args.out / "device-learning.json", args.json, format_learning)
        (args.out / "device-learning.txt").write_text(format_learning(result) + "\n")
        return 0
    ptes = args.pte or None
    if args.adb and args.e2e:
        from benchmarks.devicebench import format_e2e, run_adb_e2e

        result = run_adb_e2e(ptes[0] if ptes else None, doc=args.doc, window=args.window, max_new_tokens=args.max_new_tokens,
                             tau=args.tau, gateway_url=args.gateway_url, token=args.token, port=args.port,
                             plugin_dir=args.workdir, serial=args.serial, adb=args.adb_path, apk=args.apk,
                             install=not args.no_install, timeout=args.timeout, log=log)
        write_result(result, args.out / "device-adb-e2e.json", args.json, format_e2e)
        return 0
    if args.adb:
        result = run_adb(ptes, plugin_dir=args.workdir, serial=args.serial, adb=args.adb_path,
                         iterations=args.iterations, warmup=args.warmup, timeout=args.timeout,
                         apk=args.apk, install=not args.no_install, log=log)
    else:
        result = run_local(ptes, workdir=args.workdir, iterations=args.iterations, warmup=args.warmup, log=log)
    write_result(result, args.out / ("device-adb.json" if args.adb else "device-local.json"), args.json, format_table)
    return 0 if result.get("ok", True) else 1


def cmd_bench_bytes(args) -> int:
    from benchmarks.bytesbench import format_bytes, run_bytes_bench

    log = progress_log(args.json)
    result = run_bytes_bench(plugin=args.plugin, docs=args.docs, max_new_tokens=args.max_new_tokens,
                             tap_every=args.tap_every, levels=args.levels, workdir=args.workdir, tau=args.tau,
                             skip_cost=args.skip_cost, log=log)
    write_result(result, args.out / "bytes.json", args.json, format_bytes)
    return 0


def cmd_bench_settle(args) -> int:
    from benchmarks.provision import ensure_plugin
    from benchmarks.settle_share import format_settle_share, run_settle_share

    log = progress_log(args.json)
    plugins = args.plugins or [str(ensure_plugin(None, args.workdir, log=log))]
    result = run_settle_share(plugins, args.docs, args.max_new_tokens, log=log)
    write_result(result, args.out / "settle.json", args.json, format_settle_share)
    (args.out / "settle.txt").write_text(format_settle_share(result) + "\n")
    return 0 if all(e["lossless"] for e in result["plugins"]) else 1


def cmd_bench_load(args) -> int:
    from benchmarks.load import format_load, run_load_bench

    log = progress_log(args.json)
    if args.replicas:  # spa serve with each replica count, side by side, and the cost of a resume
        from benchmarks.load import format_replicas, run_replica_bench

        result = run_replica_bench(replicas=args.replicas, sessions=args.sessions, plugin=args.plugin,
                                   max_new_tokens=args.max_new_tokens, window=args.window, codec=args.codec,
                                   tau=args.tau, workdir=args.workdir, repeats=args.repeats, log=log)
        result["command"] = "spa " + " ".join(sys.argv[1:])
        write_result(result, args.out / "load-replicas.json", args.json, lambda r: "\n" + format_replicas(r))
        return 0 if all(row["held"] == row["sessions"] for row in result["replica_rows"]) else 1
    from benchmarks.load import plot_load

    result = run_load_bench(sessions=args.sessions, backbones=args.backbones, dtypes=args.dtypes, plugin=args.plugin,
                            max_new_tokens=args.max_new_tokens, window=args.window, codec=args.codec, tau=args.tau,
                            repeats=args.repeats, unbatched=args.unbatched, pin=not args.no_pin,
                            workdir=args.workdir, log=log)
    result["command"] = "spa " + " ".join(sys.argv[1:])
    write_result(result, args.out / "load.json", args.json, lambda r: "\n" + format_load(r))
    (args.out / "load.txt").write_text(format_load(result) + "\n")
    plot_load(result, args.out / "load.png")
    if not args.json:
        print(f"written: {args.out / 'load.txt'}, {args.out / 'load.png'}")
    return 0 if all(row["held"] == row["sessions"] for c in result["configs"] for row in c["rows"]) else 1


def cmd_bench_model(args) -> int:
    from benchmarks.tracemodel import compare, format_model, gpu_goals, gpu_predictions, traced_row
    from spa.errors import SpaError

    results = []
    for path in args.results:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            raise SpaError(f"cannot read the spa bench link result {path}: {exc}") from None
        if "cloud_only" not in results[-1].get("rows", {}) or traced_row(results[-1]) is None:
            raise SpaError(f"{path}: needs the cloud_only row and an SPA row (spa_*) of a spa bench link run")
    result = {"inputs": [str(p) for p in args.results], "compare": [compare(r) for r in results],
              "gpu": {r["profile"]["name"]: gpu_predictions(r) for r in results}, "gpu_goals": gpu_goals(results)}
    out = args.out / "model.json"
    write_result(result, out, args.json, lambda _: format_model(results))
    if not args.json:
        (args.out / "model.txt").write_text(format_model(results) + "\n")
    return 0


JSON_HELP = "print the result as JSON (progress goes to stderr)"


def _add_outputs(p, run, workdir_help=None, out_help=None, json_help=None) -> None:
    """The options every `spa bench` subcommand ends with (--workdir, --out, --json), and its handler."""
    p.add_argument("--workdir", type=Path, default=Path("runs/bench"), help=workdir_help)
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help=out_help)
    p.add_argument("--json", action="store_true", help=json_help)
    p.set_defaults(run=run)


def add_bench_parsers(bench_sub) -> None:
    """Add `link`, `device`, `bytes`, `settle`, `model` and `load` to the `spa bench` sub-subcommands."""
    p = bench_sub.add_parser("link", help="every baseline side by side over an emulated mobile link (ratios, plot)")
    p.add_argument("--profile", nargs="+", default=["4g"], choices=["loopback", "5g", "4g", "3g"],
                   help="link profile(s): loopback, 5g (20 ms, 100/50 Mbit/s), 4g (50 ms, 20 Mbit/s), "
                        "3g (150 ms, 2/1 Mbit/s); default 4g")
    p.add_argument("--plugin", help="plugin .pte (default: train and export a quick one into --workdir)")
    p.add_argument("--docs", nargs="+", default=LINK_DOCS, help="documents (default: aclsum:test:0..9)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="runs of every row, interleaved (default 3)")
    p.add_argument("--in-flight", type=int, default=4, help="side outputs in flight in the spa_inflight rows "
                                                            "(default 4)")
    p.add_argument("--per-layer-tokens", type=int, default=8,
                   help="tokens per document for the per-layer row (each costs one round trip per layer; default 8)")
    p.add_argument("--window", type=int, default=8, help="draft-ahead window W of the draft-ahead row (default 8)")
    p.add_argument("--codec", default="int8", choices=["int8", "int4", "f32"])
    p.add_argument("--rows", nargs="+", help="only these rows (cloud_only cloud_plugin side_every_token per_layer "
                                             "spa_lockstep "
                                             "spa_draft spa_draft_proj spa_draft_push spa_inflight "
                                             "spa_inflight_push spa_branches spa_settle spa_settle_branches device_only)")
    p.add_argument("--link", default="auto", choices=["auto", "netns", "proxy"],
                   help="netns: namespaces + tbf + NFQUEUE delay (root); proxy: userspace delay proxy; "
                        "auto: netns when possible (default)")
    p.add_argument("--device-variant", default="fp32", choices=["fp32", "8da4w"], help="device-only model variant")
    p.add_argument("--device-client", default="python", choices=["python", "java"],
                   help="the device of the SPA rows: the Python client (default) or the Android app's Java client "
                        "on the host JVM (android_demo; results go to link-PROFILE-java.*, beside the Python ones)")
    p.add_argument("--tau", type=float, help="gate threshold of the SPA rows (default: the plugin's trained tau)")
    p.add_argument("--skip-cost", type=float, default=0.3,
                   help="lambda of the quick plugin trained when --plugin is not given (default 0.3; spa train's "
                        "default 0.05 makes the quick plugin's gate open on ~95%% of tokens)")
    p.add_argument("--no-pin", action="store_true", help="do not pin gateway and device to different CPUs")
    p.add_argument("--report", nargs="+", type=Path, metavar="RESULT",
                   help="run nothing: report saved results (link-PROFILE.json) again with this version's goals, "
                        "text and plot, written to --out")
    _add_outputs(p, cmd_bench_link, "quick plugin and exports (reused)", "where link-PROFILE.json/.png go", JSON_HELP)

    p = bench_sub.add_parser("device", help="per-.pte load time, gate/side latency, peak memory, size "
                                           "(locally, or on a phone with --adb)")
    p.add_argument("pte", nargs="*", help=".pte files (default: the quick plugin's fp32 and int8 in --workdir)")
    p.add_argument("--adb", action="store_true", help="run on a phone over adb (the Android app's benchmark mode)")
    p.add_argument("--serial", help="adb device serial (adb -s)")
    p.add_argument("--adb-path", default="adb", help="the adb executable (default: adb on PATH)")
    p.add_argument("--iterations", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the phone's result")
    p.add_argument("--apk", type=Path, help="with --adb: the app's APK to install when the phone's is missing or older "
                                            "(default: build android_demo's with android_demo/scripts/build_apk.sh)")
    p.add_argument("--no-install", action="store_true", help="with --adb: never install; use the app as installed")
    p.add_argument("--e2e", action="store_true", help="with --adb: one summary of the split on the phone through this "
                                                      "host's gateway (adb reverse), beside the Python client's")
    p.add_argument("--doc", default="aclsum:test:0", help="--e2e: the document (default aclsum:test:0)")
    p.add_argument("--gateway-url", help="--e2e: a running gateway on this host (default: start spa gateway on --port)")
    p.add_argument("--port", type=int, default=8765, help="--e2e: the gateway port forwarded with adb reverse (default 8765)")
    p.add_argument("--token", default="", help="--e2e: the gateway's auth token")
    p.add_argument("--window", type=int, default=4, help="--e2e: draft-ahead window W (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="--e2e: tokens to generate (default 32)")
    p.add_argument("--tau", type=float, help="--e2e: gate threshold (default: the plugin's)")
    p.add_argument("--learning", action="store_true",
                   help="on-device learning instead: spa personalize (ExecuTorch training, states from a real "
                        "gateway) against spa train --examples on the same examples: seconds and peak memory per "
                        "example, bytes down per example with and without the projection, Rouge-L (~1 h here)")
    p.add_argument("--person", default="outcome", help="--learning: whose examples (evaluation/people.py)")
    p.add_argument("--examples", type=int, default=20, help="--learning: how many examples (default 20)")
    p.add_argument("--tests", type=int, default=30, help="--learning: test documents for Rouge-L (default 30)")
    _add_outputs(p, cmd_bench_device)

    p = bench_sub.add_parser("bytes", help="bytes per token of each way down (taps, int4, zstd level) "
                                          "beside its effect on tokens")
    p.add_argument("--plugin", help="plugin .pte (default: the quick plugin in --workdir)")
    p.add_argument("--docs", nargs="+", default=DEFAULT_DOCS)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--tau", type=float, help="gate threshold (default: the plugin's)")
    p.add_argument("--tap-every", type=int, nargs="*", default=[3, 5],
                   help="also train quick plugins tapping every k-th layer (default 3 5; none: skip)")
    p.add_argument("--levels", type=int, nargs="+", default=[1, 3, 9, 19], help="zstd levels (default 1 3 9 19)")
    p.add_argument("--skip-cost", type=float, default=0.3, help="lambda of the quick plugins trained here (default 0.3)")
    _add_outputs(p, cmd_bench_bytes)

    p = bench_sub.add_parser("settle", help="share of side tokens the device settles, and bytes per token both ways, "
                                            "per plugin (in process: counts, not timings)")
    p.add_argument("--plugins", nargs="+", help="plugin .pte files (default: the quick plugin in --workdir)")
    p.add_argument("--docs", type=int, default=10, help="ACLSum test papers (default 10)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    _add_outputs(p, cmd_bench_settle)

    p = bench_sub.add_parser("model", help="trace-driven model: predicted vs measured link rows, and the ratios "
                                           "a GPU-class gateway (10, 20 and 40 ms per step) would reach")
    p.add_argument("results", nargs="+", type=Path, help="spa bench link results (link-PROFILE.json)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="where model.json/model.txt go")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(run=cmd_bench_model)
    p = bench_sub.add_parser("load", help="N concurrent device sessions against one gateway: sessions held, tokens/s, "
                                          "p95 inter-token latency, peak memory, batching (ratios vs 1 session)")
    p.add_argument("--sessions", nargs="+", type=int, default=[16, 64], help="session counts (default 16 64; "
                                                                               "1 always runs first, the baseline)")
    p.add_argument("--backbones", nargs="+", default=[None], metavar="BACKBONE",
                   help="gateway backbones side by side: names (smollm2-135m, gemma3-270m) or directories "
                        "(default: the packaged SmolLM2); a quick plugin is trained per backbone")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                   help="gateway dtypes side by side (default float32)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the table shows the median and "
                                                          "min-max (default 2)")
    p.add_argument("--plugin", help="plugin .pte (default: train and export a quick one into --workdir)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens per session (default 16)")
    p.add_argument("--window", type=int, default=4, help="draft-ahead window W (default 4)")
    p.add_argument("--codec", default="int8", choices=["int8", "int4", "f32"])
    p.add_argument("--tau", type=float, help="gate threshold (default: the plugin's)")
    p.add_argument("--unbatched", action="store_true",
                   help="also run the largest count against a gateway with --max-batch 1 (no batching)")
    p.add_argument("--no-pin", action="store_true", help="do not pin gateway and devices to different CPUs")
    p.add_argument("--replicas", type=int, nargs="+",
                   help="run the counts against `spa serve --replicas R` for each R instead (e.g. 1 2), side by "
                        "side, and measure what a resume on a gateway that does not hold the session costs")
    _add_outputs(p, cmd_bench_load, "quick plugin and exports (reused)", "where load.json goes", JSON_HELP)
