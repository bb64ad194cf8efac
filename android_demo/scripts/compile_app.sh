#!/usr/bin/env bash
# Compile every source of the Android app and of the protocol module with javac against
# android.jar (API 23, Debian bullseye) and the ExecuTorch Java API classes (npm
# react-native-executorch@0.9.3), at Java 8 language level. It proves the app's Java
# compiles against the platform and ExecuTorch APIs it uses; it builds no APK (that takes
# the Android Gradle plugin: see android_demo/README.md). Output: android_demo/build/app-classes.
set -euo pipefail
. "$(dirname "$0")/common.sh"
require_tools
require_libs
require "$ANDROID_JAR" "android.jar API 23 (Debian bullseye libandroid-23-java)"
require "$EXECUTORCH_JAR" "the ExecuTorch Java classes ($EXECUTORCH_NPM, android/libs/classes.jar)"

OUT="$DEMO_DIR/build/app-classes"
rm -rf "$OUT"
mkdir -p "$OUT"
# + jni-support: the app names SoLoader's NativeLoader (NativeRuntime), which Gradle takes from Maven
SOURCES=$(java_sources "$PROTOCOL_SRC" "$APP_SRC" "$JNI_SUPPORT_SRC")
[ -n "$(java_sources "$APP_SRC")" ] || die "no app sources under $APP_SRC"
# -bootclasspath replaces the JDK's classes with Android's: any java.* API that API 23 lacks
# (java.util.function, streams, java.time, ...) fails to compile here, as it would on old phones.
javac -source 8 -target 8 -Xlint:all -Xlint:-options -Werror -encoding UTF-8 \
    -bootclasspath "$ANDROID_JAR" \
    -cp "$EXECUTORCH_JAR:$LIB_CLASSPATH" \
    -d "$OUT" $SOURCES
echo "compiled $(echo "$SOURCES" | wc -l) sources against $(basename "$ANDROID_JAR") and $(basename "$EXECUTORCH_JAR") into ${OUT#$REPO_DIR/}"
