#!/usr/bin/env bash
# Compile the pure-Java protocol module for the host JVM into android_demo/build/host/main,
# and write android_demo/build/host/classpath (what `java -cp` needs to run org.spa.protocol.Cli).
set -euo pipefail
. "$(dirname "$0")/common.sh"
require_tools
require_libs

rm -rf "$HOST_BUILD/main"
mkdir -p "$HOST_BUILD/main"
# Java 8 language level: the same sources build into the Android app (minSdk 26).
javac -source 8 -target 8 -Xlint:all -Xlint:-options -Werror -encoding UTF-8 \
    -cp "$LIB_CLASSPATH" -d "$HOST_BUILD/main" $(java_sources "$PROTOCOL_SRC")
echo "$HOST_BUILD/main:$LIB_CLASSPATH" > "$HOST_BUILD/classpath"
