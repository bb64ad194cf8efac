#!/usr/bin/env bash
# The Java device as the device side of one `spa bench link` row (`--device-client java`):
#   android_demo/scripts/bench_worker.sh JOB.json OUT.json       (org.spa.protocol.BenchWorker)
# Builds the protocol module first if needed.
set -euo pipefail
. "$(dirname "$0")/common.sh"
if [ ! -f "$HOST_BUILD/classpath" ] || [ -n "$(find "$PROTOCOL_SRC" -newer "$HOST_BUILD/classpath" -name '*.java' | head -1)" ]; then
    "$DEMO_DIR/scripts/build_protocol.sh" >&2
fi
exec java -cp "$(cat "$HOST_BUILD/classpath")" org.spa.protocol.BenchWorker "$@"
