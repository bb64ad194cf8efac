"""The `spa` command: one entry point, one subcommand per job (`python -m cli.main` runs it too).

Handlers import their role's modules lazily: torch and ExecuTorch take
seconds to import, and `spa --help` should not.
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from cli.bench import add_bench_parsers  # argparse only: cheap
from spa.errors import SpaError
from spa.system.quiet import quiet_libraries


def cmd_train(args) -> int:
    from spa.model.backbone import load_backbone
    from spa.model.plugin import MARGIN_GATE, save_plugin
    from training.train import TrainSettings, train_plugin

    if args.examples:
        examples, settings = _read_training_examples(args)  # before the slow backbone load: bad files fail fast
    else:
        settings = TrainSettings.quick(args.profile, args.seed) if args.quick else TrainSettings(args.profile, args.seed)
    for name in ("epochs", "rank", "tap_every", "skip_cost", "max_usage", "lr", "max_doc_tokens", "train_docs", "val_docs",
                 "combination", "gate_labels", "label_folds"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    if args.gate_margin:
        settings.gate_input = MARGIN_GATE
    backbone = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    if args.examples:
        from training.examples import train_from_examples

        plugin, metrics = train_from_examples(backbone, examples, settings)
    else:
        plugin, metrics = train_plugin(backbone, settings)
    digest = save_plugin(plugin, args.out)
    val = metrics["val"]
    summary = {"plugin": str(args.out), "content_hash": digest, "profile": settings.profile, "tau": plugin.config.tau,
               "taps": len(plugin.config.taps), "metrics": metrics}
    if args.examples:
        summary["examples"] = plugin.config.training["examples"]
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for split in ("train", "val"):
            m = metrics[split]
            print(f"{split:5} loss: backbone {m['loss_backbone']:.3f} | side always on {m['loss_side_always']:.3f} | "
                  f"gated at tau {plugin.config.tau:.3g}: {m['loss_gated']:.3f} with side usage {m['side_usage']:.0%}")
        if args.examples:
            print(f"validation: {summary['examples']['validation']}")
        print(f"saved plugin {digest} to {args.out} "
              f"(val loss {val['loss_backbone']:.3f} -> {val['loss_gated']:.3f})")
    return 0


def _read_training_examples(args):
    """(the examples of `--examples`, their training settings), or a one-line error before any work."""
    from device_runtime.documents import check_doc_tokens
    from spa.data.examples import read_examples
    from training.examples import example_settings

    if args.train_docs is not None or args.val_docs is not None:
        raise SpaError("--train-docs and --val-docs select ACLSum papers (--profile); with --examples every example "
                       "in the file is used")
    if args.combination == "replace":
        raise SpaError("--combination replace is for the ACLSum evaluation rows (--profile), not for --examples")
    settings = example_settings(args.seed, args.quick)
    if args.max_doc_tokens is not None:
        settings.max_doc_tokens = check_doc_tokens(args.max_doc_tokens)
    examples = read_examples(args.examples, settings.max_doc_tokens)
    if examples.note():
        print(f"spa train: {examples.note()}", file=sys.stderr, flush=True)
    return examples, settings


def cmd_export(args) -> int:
    from export.export import export_plugin, format_manifest

    progress = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.json else print
    manifest = export_plugin(args.plugin_dir, args.out, variants=args.variants, progress=progress)
    if not args.no_head:  # the backbone's output head, for devices that settle their side tokens (once per backbone)
        from spa.model.output_head import ensure_head

        head = ensure_head(manifest["backbone"], args.backbone, log=progress)
        manifest["output_head"] = None if head is None else str(head)
        if args.training:  # the program a device learns with (spa personalize): its loss reads the head
            from export.training_program import export_training

            manifest["training"] = export_training(args.plugin_dir, args.out, head, progress)
    print(json.dumps(manifest, indent=2) if args.json else format_manifest(manifest, Path(args.out)))
    return 0 if all(v["parity"]["ok"] for v in manifest["variants"].values()) else 1


def _limits(args):
    from spa.protocol.limits import Limits

    overrides = {name: getattr(args, name) for name in ("max_sessions", "max_prompt_tokens", "max_new_tokens",
                                                           "idle_timeout_s", "max_frame_bytes", "resume_grace_s",
                                                           "send_timeout_s") if getattr(args, name) is not None}
    return Limits(**overrides)


def cmd_gateway(args) -> int:
    import asyncio

    from cloud_gateway.server import run_gateway
    from spa.model.backbone import load_backbone

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from cloud_gateway.server import is_loopback

    token = args.token or os.environ.get("SPA_GATEWAY_TOKEN") or None
    if not is_loopback(args.host) and not token:  # before the slow backbone load
        raise SpaError(f"refusing to listen on {args.host} without an auth token: pass --token or set SPA_GATEWAY_TOKEN")
    from cloud_gateway.server import tls_context

    if args.keyfile and not args.certfile:
        raise SpaError("--keyfile needs --certfile")
    tls = tls_context(args.certfile, args.keyfile) if args.certfile else None  # before the slow backbone load
    from spa.protocol.resume_tokens import load_secret

    resume_secret = load_secret(args.resume_secret_file)  # the file, else $SPA_RESUME_SECRET, else per process
    backbone = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    asyncio.run(run_gateway(backbone, args.host, args.port, _limits(args), token,
                            announce=lambda line: print(line, flush=True), ssl_context=tls, max_batch=args.max_batch,
                            resume_secret=resume_secret, branches=args.branches, settle=args.settle))
    return 0


def cmd_serve(args) -> int:
    """`spa serve`: `spa gateway` as N Ray Serve replicas (cloud_gateway/ray_serve.py)."""
    import secrets

    from cloud_gateway.server import is_loopback
    from spa.protocol.resume_tokens import load_secret

    token = args.token or os.environ.get("SPA_GATEWAY_TOKEN") or None
    if not is_loopback(args.host) and not token:
        raise SpaError(f"refusing to listen on {args.host} without an auth token: pass --token or set SPA_GATEWAY_TOKEN")
    if args.keyfile and not args.certfile:
        raise SpaError("--keyfile needs --certfile")
    if args.replicas < 1 or (args.min_replicas or 1) < 0 or (args.max_replicas or 1) < 1:
        raise SpaError("replica counts must be positive")
    if not 0 < args.replica_cpus <= 1:
        raise SpaError("--replica-cpus must be in (0, 1]: each replica runs one compute thread")
    try:
        from cloud_gateway.ray_serve import deployment_options, run_serve
    except ImportError as exc:
        raise SpaError(f"spa serve needs Ray Serve (scripts/setup.sh installs ray[serve]): {exc}") from None
    limits = _limits(args)
    # Every replica signs and checks resume tokens with the same secret: the file, $SPA_RESUME_SECRET, or one
    # made here for this deployment (then a restarted `spa serve` cannot resume the old sessions).
    secret = load_secret(args.resume_secret_file) or secrets.token_bytes(32)
    config = {"backbone": args.backbone, "dtype": args.dtype, "device": args.device, "auth_token": token,
              "limits": limits.to_dict(), "max_batch": args.max_batch, "resume_secret": secret,
              "torch_threads": args.torch_threads, "verbose": args.verbose, "branches": args.branches,
              "settle": args.settle}
    options = deployment_options(args.replicas, args.min_replicas, args.max_replicas, args.target_sessions,
                                 limits.max_sessions, args.replica_cpus, args.replica_gpus, args.torch_threads)
    run_serve(config, host=args.host, port=args.port, address=args.address, options=options,
              certfile=args.certfile, keyfile=args.keyfile, announce=lambda line: print(line, flush=True))
    return 0


def cmd_summarize(args) -> int:
    import asyncio

    from device_runtime.client import run_session
    from device_runtime.documents import check_doc_tokens, device_prompt, read_document
    from device_runtime.render import StreamPrinter, format_stats
    from spa.protocol.messages import Options
    from spa.model.personal import open_plugin

    if args.max_doc_tokens is not None:
        check_doc_tokens(args.max_doc_tokens)  # before the slow plugin load
    pte = open_plugin(args.plugin)  # an exported .pte, or the plugin a device learned (spa personalize)
    document = read_document(args.document, args.max_doc_tokens or pte.config.max_doc_tokens)
    # A text the user gave is cut silently no more; an ACLSum paper is always
    # built by its documented sentence rule (docs/PROTOCOL.md §4, "The
    # prompt"), so its note goes to --json only and the demo's output stays as it was.
    if document.note() and document.unit == "words":
        print(f"spa summarize: {document.note()}", file=sys.stderr, flush=True)
    prompt = device_prompt(pte.config, document.text)
    if args.in_flight < 1:
        raise SpaError(f"--in-flight must be at least 1, got {args.in_flight}")
    options = Options(window=args.window, codec=args.codec, outliers=args.outliers,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    highlight = args.highlight or ("ansi" if sys.stdout.isatty() else "brackets")
    printer = None if args.json else StreamPrinter(sys.stdout, highlight)
    token = args.token or os.environ.get("SPA_GATEWAY_TOKEN", "")
    result = asyncio.run(run_session(args.gateway, pte, prompt, options, tau=args.tau, token=token, on_commit=printer,
                                     cafile=args.cafile, reconnect=not args.no_reconnect,
                                     cloud_projection=args.cloud_projection, push_taps=args.push_taps,
                                     max_in_flight=args.in_flight, settle=args.settle))
    if args.json:
        print(json.dumps({"text": result.text, "tokens": result.tokens, "sigmas": result.sigmas,
                          "finish_reason": result.finish_reason, "document": document.note() or "whole",
                          "stats": result.stats}, indent=2))
    else:
        printer.finish()
        print(format_stats(result.stats))
    return 0


def cmd_personalize(args) -> int:
    import asyncio

    from device_runtime.personalize import personalize, print_report
    from training.examples import example_settings

    settings = example_settings(args.seed)
    if args.epochs is not None:
        if args.epochs < 1:
            raise SpaError(f"--epochs must be at least 1, got {args.epochs}")
        settings.epochs = args.epochs
    token = args.token or os.environ.get("SPA_GATEWAY_TOKEN", "")
    bars = {}

    def progress(done, total, what):  # one bar per stage, on stderr
        from tqdm import tqdm

        stage = "states" if what.startswith("states") else "learning"
        bar = bars.get(stage) or bars.setdefault(stage, tqdm(total=total, desc=f"spa personalize: {stage}",
                                                               unit="example" if stage == "states" else "batch",
                                                               file=sys.stderr, leave=False))
        bar.total = max(bar.total, total)
        bar.set_postfix_str(what[:40])
        bar.update(done - bar.n)

    report = asyncio.run(personalize(args.gateway, args.plugin, args.examples, out=args.out, token=token,
                                     cafile=args.cafile, codec=args.codec, outliers=args.outliers,
                                     cloud_projection=args.cloud_projection, settings=settings, progress=progress,
                                     log=lambda line: print(line, file=sys.stderr, flush=True)))
    for bar in bars.values():
        bar.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0


def cmd_eval(args) -> int:
    command = "spa eval " + " ".join(sys.argv[2:])
    if args.examples:
        return _eval_examples(args, command)
    if args.test is not None:
        raise SpaError("--test needs --examples (the person's examples to train from)")
    args.out = args.out or Path("results/quality")
    from evaluation.run import RECIPES, evaluate, write_report

    if args.pool:
        return _pool_reports(args.pool, args.out, command)
    from spa.data.aclsum import load_split

    available = len(load_split(args.split))
    if not 0 <= args.first_paper < available or (args.papers is not None and args.papers < 1):
        print(f"error: need 0 <= --first-paper < {available} (the {args.split} split's papers) and --papers >= 1, "
              f"not --first-paper {args.first_paper} --papers {args.papers}", file=sys.stderr)
        return 2
    from spa.model.backbone import load_backbone

    backbone = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    sizes = () if args.no_sizes else (25, 50)
    results = evaluate(backbone, args.profiles, args.papers, args.max_new_tokens, args.workdir, sizes, args.split,
                       on_checkpoint=lambda partial: write_report(partial, args.out, command),
                       tune_papers=args.tune_papers, replacement=not args.no_replacement,
                       recipes=tuple(RECIPES[name] for name in args.recipes), first_paper=args.first_paper,
                       goal_only=args.goal_only)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print((args.out / "results.md").read_text())
        print(f"written: {args.out / 'results.md'}, {args.out / 'results.json'}, {args.out / 'tau_sweep.png'}")
    return 0


def _eval_examples(args, command: str) -> int:
    """`spa eval --examples FILE [--test FILE2]`: SPA against the backbone, few-shot and LoRA (evaluation/personal.py)."""
    import dataclasses

    from device_runtime.documents import check_doc_tokens
    from spa.data.examples import MIN_EXAMPLES, read_examples

    max_doc_tokens = check_doc_tokens(args.max_doc_tokens or 384)
    examples = read_examples(args.examples, max_doc_tokens)  # before the slow backbone load: bad files fail fast
    if args.test is not None:
        tests = read_examples(args.test, max_doc_tokens, minimum=1)
    else:
        if not 0 < args.test_share < 1:
            raise SpaError(f"--test-share must be between 0 and 1, got {args.test_share}")
        held = max(1, round(len(examples) * args.test_share))
        if len(examples) - held < MIN_EXAMPLES:
            raise SpaError(f"{args.examples}: {len(examples)} examples leave {len(examples) - held} to train on after "
                           f"holding out {held} for the test; give --test FILE2 or more examples")
        tests = dataclasses.replace(examples, examples=examples.examples[-held:])
        examples = dataclasses.replace(examples, examples=examples.examples[:-held])
    for note in {examples.note(), tests.note()} - {None}:
        print(f"spa eval: {note}", file=sys.stderr, flush=True)
    from evaluation.personal import evaluate_person, markdown, write_person_report
    from spa.model.backbone import load_backbone

    backbone = load_backbone(args.backbone, dtype=args.dtype, device=args.device)
    out = args.out or Path("runs/personal/eval")
    result = evaluate_person(backbone, examples, tests, args.workdir / f"personal-{examples.sha256[:12]}",
                             args.max_new_tokens, lora=not args.no_lora,
                             log=lambda msg: print(msg, file=sys.stderr, flush=True),
                             progress=lambda i, n: print(f"test documents: {i}/{n}", file=sys.stderr, flush=True))
    write_person_report(result, out, command)
    print(json.dumps(result, indent=2) if args.json else markdown(result, command))
    if not args.json:
        print(f"written: {out / 'results.md'}, {out / 'results.json'}")
    return 0


def _pool_reports(paths: list[Path], out: Path, command: str) -> int:
    from evaluation.pool import PoolError, pool
    from evaluation.run import write_report

    reports = []
    for path in paths:
        try:
            reports.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            print(f"error: cannot read the report {path}: {exc}", file=sys.stderr)
            return 2
    try:
        results = pool(reports)
    except (PoolError, KeyError) as exc:  # KeyError: a JSON file that is not a `spa eval` report
        print(f"error: cannot pool {' '.join(map(str, paths))}: {exc}", file=sys.stderr)
        return 2
    write_report(results, out, command)
    print((out / "results.md").read_text())
    print(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'tau_sweep.png'}")
    return 0


def cmd_demo(args) -> int:
    from cli.demo import run_demo

    return run_demo(args.profile, args.workdir, args.document, spa=main)


def _add_backbone_numerics(p) -> None:
    """--dtype/--device: how the backbone runs (the numerics contract holds within one dtype)."""
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="backbone weights and activations (default float32)")
    p.add_argument("--device", default="cpu", help="torch device for the backbone: cpu, cuda, cuda:1, ... (default cpu)")


def _branches(text: str) -> int:
    k = int(text)
    if not 0 <= k <= 16:
        raise argparse.ArgumentTypeError(f"--branches must be in 0..16 (got {k})")
    return k


def _add_serving_options(p) -> None:
    """The options `spa gateway` and `spa serve` share: backbone, auth, limits, resume, TLS, batching."""
    p.add_argument("--backbone", help="Hugging Face causal-LM directory (default: the packaged SmolLM2-135M-Instruct)")
    _add_backbone_numerics(p)
    p.add_argument("--token", help="auth token devices must send (default: $SPA_GATEWAY_TOKEN; required off loopback)")
    p.add_argument("--max-sessions", type=int, help="concurrent sessions (default 8); more are refused with 'busy'")
    p.add_argument("--max-prompt-tokens", type=int, help="longest prompt accepted (default 4096)")
    p.add_argument("--max-new-tokens", type=int, help="largest max_new_tokens a session may ask (default 2048)")
    p.add_argument("--idle-timeout", dest="idle_timeout_s", type=float, help="seconds of device silence before a session is closed (default 120)")
    p.add_argument("--max-frame-bytes", type=int, help="largest websocket message accepted (default 2 MiB)")
    p.add_argument("--resume-grace", dest="resume_grace_s", type=float,
                   help="seconds a session whose connection was lost waits for its device to resume (default 30; 0: off)")
    p.add_argument("--resume-secret-file", help="file holding the secret that signs resume tokens, shared by every "
                   "gateway of a deployment so that any of them (or this one restarted) resumes a session "
                   "(default: $SPA_RESUME_SECRET, else a random secret per process)")
    p.add_argument("--send-timeout", dest="send_timeout_s", type=float,
                   help="seconds a device may leave sent data unread before it is dropped as a slow reader (default 30)")
    p.add_argument("--certfile", help="TLS certificate chain (PEM): serve wss:// instead of ws://")
    p.add_argument("--keyfile", help="TLS private key (PEM), if not inside --certfile")
    p.add_argument("--max-batch", type=int, default=64, help="most sessions' decode steps run as one batched forward "
                   "(default 64; 1: no batching)")
    p.add_argument("--no-settle", dest="settle", action="store_false",
                   help="do not let devices settle their own side tokens (by default they may, where the logits "
                        "are float32): every side token then costs a verdict")
    p.add_argument("--branches", type=_branches, default=0, metavar="K",
                   help="branch drafting: while a side output is pending, also draft the continuations of the "
                        "backbone's K next-best tokens there, batched with the main draft, so a verdict that "
                        "changes the token to one of them streams its continuation at once (default 0: off)")
    p.add_argument("-v", "--verbose", action="store_true", help="log sessions")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spa", description="Side Plugin Adaptation: personalized generation split "
                                     "between a phone (ExecuTorch plugin) and a cloud (frozen backbone).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a person's side plugin (side network + gate) from their own examples "
                       "(--examples) or an ACLSum reader profile (--profile)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--examples", type=Path, metavar="FILE",
                      help="your own (document, summary) pairs: JSON Lines with \"document\" and \"summary\" fields, "
                           "or CSV/TSV with those columns; at least 5; any plain-text domain. Validation is held out "
                           "automatically (cross-fitted folds under 20 examples)")
    what.add_argument("--profile", help="an ACLSum reader profile instead: challenge, approach or outcome")
    p.add_argument("--out", required=True, type=Path, help="plugin directory to write")
    p.add_argument("--backbone", help="Hugging Face causal-LM directory (default: the packaged SmolLM2-135M-Instruct)")
    _add_backbone_numerics(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="128-token documents (with --profile also 16 train / 8 val "
                   "papers): ~1 minute")
    p.add_argument("--epochs", type=int)
    p.add_argument("--rank", type=int, help="side network width r (default 32)")
    p.add_argument("--tap-every", type=int, help="tap every k-th layer (default 1: all layers)")
    p.add_argument("--combination", choices=["add", "replace"],
                   help="add (default: f + s, SPA) or replace (s instead of f: the paper's S2/S3 settings, for "
                        "evaluation only; the split refuses such plugins)")
    p.add_argument("--skip-cost", "--lambda", dest="skip_cost", type=float,
                   help="lambda: nats a token's loss must drop to open the gate (default 0.3); higher -> less side usage")
    p.add_argument("--max-usage", type=float,
                   help="tau keeps the side usage on validation at most this share (default 0.5)")
    p.add_argument("--gate-labels", choices=["gain", "flip", "helpful"],
                   help="what the gate learns: gain (default: the side lowers the loss by more than lambda), flip "
                        "(the side changes the greedy token) or helpful (it changes it to the reference's)")
    p.add_argument("--label-folds", type=int, help="cross-fitting folds for the gate labels (default 2)")
    p.add_argument("--gate-margin", action="store_true",
                   help="the gate also reads the backbone's top-2 logit margin at each position (sent with each "
                        "step, a few bytes): it finds more of the tokens the side changes; pairs well with "
                        "--gate-labels flip")
    p.add_argument("--lr", type=float)
    p.add_argument("--max-doc-tokens", type=int, help="truncate each document to about this many tokens (default 384)")
    p.add_argument("--train-docs", type=int, help="use only the first N train papers")
    p.add_argument("--val-docs", type=int, help="use only the first N validation papers")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("export", help="export a plugin directory to ExecuTorch .pte files and verify them")
    p.add_argument("plugin_dir", type=Path)
    p.add_argument("--out", required=True, type=Path, help="directory for the .pte files")
    p.add_argument("--variants", nargs="+", default=["fp32", "int8"], choices=["fp32", "int8"])
    p.add_argument("--json", action="store_true", help="print the manifest (sizes, parity errors) as JSON")
    p.add_argument("--backbone", help="the backbone's directory, to write its output head for settlement (default: "
                   "the packaged backbone the plugin was trained on, if converted here)")
    p.add_argument("--no-head", action="store_true", help="do not write the backbone's output head (nor the "
                   "training program, whose loss needs it)")
    p.add_argument("--no-training", dest="training", action="store_false",
                   help="do not write the training program (plugin-train.pte/.ptd) a device learns with "
                        "(spa personalize); it adds ~1 min to the export")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("gateway", help="serve the backbone to devices over websockets")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (0: pick a free one; the banner says which)")
    _add_serving_options(p)
    p.set_defaults(run=cmd_gateway)

    p = sub.add_parser("serve", help="serve the backbone as a Ray Serve application: N gateway replicas behind one "
                       "WebSocket endpoint (a local Ray cluster, or --address)")
    p.add_argument("--host", default="127.0.0.1", help="interface of Ray Serve's proxy (default 127.0.0.1; any other "
                   "needs --token)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
    p.add_argument("--address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a "
                   "local one")
    p.add_argument("--replicas", type=int, default=1, help="gateway replicas, each with its own backbone (default 1)")
    p.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas on "
                   "ongoing sessions instead of a fixed count")
    p.add_argument("--max-replicas", type=int)
    p.add_argument("--target-sessions", type=float, default=4.0,
                   help="autoscaling: device connections per replica to aim for (default 4)")
    p.add_argument("--replica-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    p.add_argument("--replica-gpus", type=float, default=0.0, help="GPUs per replica (default 0; with --device cuda)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per replica (default 1)")
    _add_serving_options(p)
    p.set_defaults(run=cmd_serve)

    p = sub.add_parser("summarize", help="write a personalized summary through the gateway (the device side)")
    p.add_argument("document", help="a text file, '-' for stdin, or aclsum:SPLIT:INDEX (e.g. aclsum:test:0)")
    p.add_argument("--gateway", default="ws://127.0.0.1:8765", help="gateway URL (default ws://127.0.0.1:8765)")
    p.add_argument("--plugin", required=True, type=Path, help="the reader's exported plugin (.pte)")
    p.add_argument("--tau", type=float, help="gate threshold (default: the plugin's, chosen on validation)")
    p.add_argument("--max-doc-tokens", type=int,
                   help="document budget in tokens of ~4 characters (default: the plugin's, 384 or 128 for a quick "
                        "plugin; at most 4096); a longer document is cut, and a line on stderr says what was kept")
    p.add_argument("--window", type=int, default=4, help="draft-ahead window W (0: lock-step; default 4)")
    p.add_argument("--codec", default="int8", choices=["int8", "int4", "f32"], help="activation encoding on the wire")
    p.add_argument("--outliers", type=int, default=8, help="outlier channels per row sent in fp16 (default 8)")
    p.add_argument("--no-cloud-projection", dest="cloud_projection", action="store_false",
                   help="keep the side network's per-tap projections on the device; by default the gateway applies "
                        "them (each side token then moves r values per tap instead of H: ~18x fewer bytes down): "
                        "they cross once (~1.1 MB) and the gateway keeps them in memory under their hash, so later "
                        "sessions name them instead")
    p.add_argument("--in-flight", type=int, default=4, metavar="N",
                   help="side outputs that may await their verdict at once (1: one at a time; default 4)")
    p.add_argument("--no-push-taps", dest="push_taps", action="store_false",
                   help="do not upload the gate (by default it is: 4.6 KB, and the gateway sees every sigma anyway) "
                        "so that the gateway sends the taps with the step where the gate will open; without it a "
                        "side token costs two round trips instead of one")
    p.add_argument("--no-settle", dest="settle", action="store_false",
                   help="send every side output and wait for the gateway's verdict; by default the device proves "
                        "a side token's token itself where it can (needs the backbone's output head, which spa "
                        "export writes; greedy only): the side output stays on the device and no round trip is "
                        "waited for")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); >0: sampling seeded by --seed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token", help="auth token (default: $SPA_GATEWAY_TOKEN)")
    p.add_argument("--cafile", help="CA bundle (PEM) to trust for a wss:// gateway, e.g. its self-signed certificate")
    p.add_argument("--no-reconnect", action="store_true", help="fail instead of resuming after a lost connection")
    p.add_argument("--highlight", choices=["ansi", "brackets", "none"], help="mark side-network tokens (default: ansi on a terminal)")
    p.add_argument("--json", action="store_true", help="print text, tokens, sigmas and stats as one JSON object")
    p.set_defaults(run=cmd_summarize)

    p = sub.add_parser("personalize", help="the device learns from its user's own examples (training on the device, "
                       "the backbone's states from the gateway) and keeps the new plugin")
    p.add_argument("--examples", required=True, type=Path, metavar="FILE",
                   help="your own (document, summary) pairs, as for spa train --examples (JSON Lines or CSV/TSV)")
    p.add_argument("--plugin", required=True, type=Path,
                   help="the plugin to teach: an export's .pte (or its directory; spa export writes the training "
                        "program beside it), or a personal plugin store from an earlier run (it learns on)")
    p.add_argument("--gateway", default="ws://127.0.0.1:8765", help="gateway URL (default ws://127.0.0.1:8765)")
    p.add_argument("--out", type=Path, help="the personal plugin store to make (default: personal/ in the export "
                   "directory; an existing store learns on)")
    p.add_argument("--cloud-projection", action="store_true",
                   help="the gateway applies the side network's per-tap projections (as spa summarize does by "
                        "default): ~7.5x fewer bytes down per example (measured); the device then learns the rest "
                        "of the side network and keeps the projections as they are")
    p.add_argument("--codec", default="int8", choices=["int8", "int4", "f32"], help="how the states travel")
    p.add_argument("--outliers", type=int, default=8)
    p.add_argument("--epochs", type=int, help="side network epochs (default: as spa train --examples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--token", help="auth token (default: $SPA_GATEWAY_TOKEN)")
    p.add_argument("--cafile", help="CA bundle (PEM) to trust for a wss:// gateway")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(run=cmd_personalize)

    p = sub.add_parser("eval", help="Rouge-L of the paper's rows (prompted backbone, side always on, SPA, tau sweep, "
                       "training size) on the ACLSum test split; with --examples, SPA against few-shot prompting and "
                       "LoRA trained on a person's own examples")
    p.add_argument("--profiles", nargs="+", default=["challenge", "approach", "outcome"])
    p.add_argument("--papers", type=int, help="only the first N papers of the split (default: all)")
    p.add_argument("--first-paper", type=int, default=0, metavar="K",
                   help="skip the split's first K papers (a run to pool with an earlier one; default 0)")
    p.add_argument("--goal-only", action="store_true",
                   help="only the rows the goal compares: backbone, side always on, SPA and the --recipes rows")
    p.add_argument("--pool", nargs="+", type=Path, metavar="RESULTS_JSON",
                   help="run nothing: pool reports over disjoint papers (same plugins, same tau) into --out")
    p.add_argument("--split", default="test", choices=["val", "test"], help="test (the report) or val (for tuning)")
    p.add_argument("--no-sizes", action="store_true", help="skip the training-size rows (small/medium plugins)")
    p.add_argument("--no-replacement", action="store_true", help="skip the paper's S2/S3 rows (replacement plugins)")
    p.add_argument("--recipes", nargs="*", default=[], choices=["flip", "margin", "helpful"],
                   help="further gate recipes, each a row 'SPA with <recipe>' with its own plugin and tau tuned on "
                        "validation Rouge-L at <= 37%% side usage in generation (flip: the gate learns where the side "
                        "changes the greedy token; margin: flip, and the gate also reads the backbone's top-2 logit "
                        "margin; helpful: margin, taught only the changes to the reference's token)")
    p.add_argument("--tune-papers", type=int, help="validation papers for tuning tau on Rouge-L (default: all 50; "
                   "cached in the workdir)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="generation cap (default 48: summaries are one sentence)")
    p.add_argument("--workdir", type=Path, default=Path("runs/eval"), help="plugins and exports (reused when unchanged)")
    p.add_argument("--out", type=Path, help="results.md, results.json, tau_sweep.png (default results/quality; with "
                   "--examples runs/personal/eval)")
    p.add_argument("--examples", type=Path, metavar="FILE",
                   help="a person's own (document, summary) pairs (as spa train --examples): report SPA against the "
                        "backbone, 1- and 3-shot prompting with these examples and LoRA on the backbone, on --test")
    p.add_argument("--test", type=Path, metavar="FILE2", help="with --examples: the person's test pairs (same format; "
                   "default: hold out the last --test-share of FILE)")
    p.add_argument("--test-share", type=float, default=0.2, help="with --examples and no --test: the share of FILE "
                   "held out for the test, from its end (default 0.2)")
    p.add_argument("--no-lora", action="store_true", help="with --examples: skip the LoRA row (its training is the "
                   "slowest part)")
    p.add_argument("--max-doc-tokens", type=int, help="with --examples: document budget (default 384)")
    p.add_argument("--backbone", help="Hugging Face causal-LM directory (default: SmolLM2-135M-Instruct)")
    _add_backbone_numerics(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("demo", help="train, export, serve and summarize through the split (the README's demo)")
    p.add_argument("--profile", default="outcome", help="reader profile (default: outcome)")
    p.add_argument("--workdir", type=Path, default=Path("runs/demo"), help="where the demo writes (default runs/demo)")
    p.add_argument("--document", default="aclsum:test:0", help="what to summarize (default aclsum:test:0)")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("bench", help="performance benchmarks: emulated links, device micro-benchmarks, bytes per token")
    bench = p.add_subparsers(dest="bench_command", required=True)
    add_bench_parsers(bench)  # link, device, bytes, load
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    try:
        return args.run(args)
    except SpaError as exc:
        print(f"spa {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"spa {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
