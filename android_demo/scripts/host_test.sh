#!/usr/bin/env bash
# Compile the protocol module and its JUnit tests, and run them on the host JVM.
# The tests read the shared vectors in tests/vectors (codec, plugin).
set -euo pipefail
. "$(dirname "$0")/common.sh"
require "$JUNIT_JAR" "JUnit 4 (Debian junit4)"
require "$HAMCREST_JAR" "Hamcrest (Debian libhamcrest-java)"
require "$EXECUTORCH_JAR" "the ExecuTorch Java classes (the app's tests build ExecuTorch's exceptions; never Module, which loads native code)"
"$DEMO_DIR/scripts/build_protocol.sh"

rm -rf "$HOST_BUILD/test"
mkdir -p "$HOST_BUILD/test"
TEST_CP="$HOST_BUILD/main:$LIB_CLASSPATH:$JUNIT_JAR:$HAMCREST_JAR:$EXECUTORCH_JAR"
# + the fbjni/NativeLoader classes of jni-support, and the app's Android-free logic
# (org.spa.demo.core, compiled here WITHOUT android.jar: an android.* import there fails), with
# their tests (the parts that run on a JVM)
javac -source 8 -target 8 -Xlint:-options -encoding UTF-8 \
    -cp "$TEST_CP" -d "$HOST_BUILD/test" $(java_sources "$PROTOCOL_TEST_SRC" "$JNI_SUPPORT_SRC" "$JNI_SUPPORT_TEST_SRC" \
        "$APP_CORE_SRC" "$APP_TEST_SRC")
echo "$HOST_BUILD/test:$TEST_CP" > "$HOST_BUILD/test-classpath"

TESTS=$(for dir in "$PROTOCOL_TEST_SRC" "$JNI_SUPPORT_TEST_SRC" "$APP_TEST_SRC"; do
    (cd "$dir" && find . -name '*Test.java' | sed 's|^\./||; s|\.java$||; s|/|.|g')
done | sort)
[ -n "$TESTS" ] || die "no JUnit tests found under $PROTOCOL_TEST_SRC"
exec java -Dspa.repo="$REPO_DIR" -cp "$HOST_BUILD/test:$TEST_CP" org.junit.runner.JUnitCore $TESTS
