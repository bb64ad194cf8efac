"""The `spa` command line: the top layer.

`cli.main` is the entry point (`spa ...`); it reaches the role folders
(training, export, cloud_gateway, device_runtime, evaluation, benchmarks)
and the core `spa/`. Nothing imports this package: it sits above them all.
"""
