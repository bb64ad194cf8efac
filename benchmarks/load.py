"""`spa bench load`: many concurrent device sessions against one gateway (work in progress)."""


def add_load_parser(bench_sub) -> None:
    p = bench_sub.add_parser("load", help="concurrent device sessions against one gateway: tokens/s, latency, memory")
    p.add_argument("--sessions", nargs="+", type=int, default=[1, 16, 32, 64])
    p.set_defaults(run=cmd_bench_load)


def cmd_bench_load(args) -> int:
    raise NotImplementedError
