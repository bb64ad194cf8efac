"""`spa demo`: the README's first command, end to end on the packaged defaults.

1. train a quick plugin for one reader profile (real SmolLM2, real ACLSum),
2. export it to ExecuTorch `.pte` files and verify them with the runtime,
3. start the cloud gateway on loopback,
4. summarize an ACLSum test paper through the split (the device side runs the
   `.pte` in the ExecuTorch runtime), first lock-step then with draft-ahead,
5. shut the gateway down.
"""

from pathlib import Path

from cloud_gateway.process import GatewayProcess


def _step(spa, number: int, total: int, what: str, argv: list[str]) -> None:
    print(f"\n== demo step {number}/{total}: {what}\n$ spa {' '.join(argv)}", flush=True)
    code = spa(argv)
    if code != 0:
        raise SystemExit(f"demo stopped: step {number} failed (exit {code})")


def run_demo(profile: str, workdir: Path, document: str, spa) -> int:
    """`spa` runs one `spa` command line (`cli.main.main`), passed in so this module does not import it back."""
    plugin_dir, export_dir = workdir / f"plugin-{profile}", workdir / f"export-{profile}"
    pte = str(export_dir / "plugin-fp32.pte")
    _step(spa, 1, 5, f"train a quick plugin for the '{profile}' reader",
          ["train", "--quick", "--profile", profile, "--out", str(plugin_dir)])
    _step(spa, 2, 5, "export it to ExecuTorch and verify it",  # (the training program: spa export without --no-training)
          ["export", str(plugin_dir), "--out", str(export_dir), "--no-training"])
    print("\n== demo step 3/5: start the cloud gateway on loopback\n$ spa gateway --port 0", flush=True)
    with GatewayProcess() as gateway:
        print(gateway.output[-1].rstrip(), flush=True)
        common = ["summarize", document, "--plugin", pte, "--gateway", gateway.url, "--max-new-tokens", "48"]
        _step(spa, 4, 5, "summarize a test paper through the split, lock-step "
              "(tokens chosen with the side network are marked)", [*common, "--window", "0"])
        _step(spa, 5, 5, "the same with draft-ahead (W = 4): same tokens, fewer round trips", [*common, "--window", "4"])
    print(f"\ndemo done: gateway stopped; plugin in {plugin_dir}, .pte files in {export_dir}.\n"
          f"Try: spa gateway & spa summarize aclsum:test:5 --plugin {pte}", flush=True)
    return 0
