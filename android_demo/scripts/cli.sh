#!/usr/bin/env bash
# Run the Java device client on the host (builds the protocol module first if needed):
#   android_demo/scripts/cli.sh --gateway ws://127.0.0.1:PORT --plugin EXPORT_DIR --prompt-file FILE [...]
# See org.spa.protocol.Cli for every option.
set -euo pipefail
. "$(dirname "$0")/common.sh"
if [ ! -f "$HOST_BUILD/classpath" ] || [ -n "$(find "$PROTOCOL_SRC" -newer "$HOST_BUILD/classpath" -name '*.java' | head -1)" ]; then
    "$DEMO_DIR/scripts/build_protocol.sh" >&2
fi
exec java -cp "$(cat "$HOST_BUILD/classpath")" org.spa.protocol.Cli "$@"
