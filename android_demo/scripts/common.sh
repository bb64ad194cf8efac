# Shared by the Android demo's scripts (sourced, not run): where things are, and a loud failure.
# Jars come from Debian packages (scripts/setup_java.sh installs them); android.jar
# and the ExecuTorch Java classes are fetched once into the cache below.

DEMO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REPO_DIR="$(cd "$DEMO_DIR/.." && pwd)"
ANDROID_CACHE="${SPA_ANDROID_CACHE:-${SPA_CACHE_DIR:-$HOME/.cache/spa}/android}"
JAVA_SHARE=/usr/share/java

# ExecuTorch's Java API (org.pytorch.executorch) as shipped in this npm package's android/libs/classes.jar.
EXECUTORCH_NPM=react-native-executorch@0.9.3
ANDROID_JAR="$ANDROID_CACHE/android-23.jar"
EXECUTORCH_JAR="$ANDROID_CACHE/executorch-classes-react-native-executorch-0.9.3.jar"

MSGPACK_JAR="$JAVA_SHARE/msgpack-core.jar"
ZSTD_JAR="$JAVA_SHARE/zstd-jni.jar"
OKHTTP_JAR="$JAVA_SHARE/okhttp.jar"
OKIO_JAR="$JAVA_SHARE/okio.jar"
JUNIT_JAR="$JAVA_SHARE/junit4.jar"
HAMCREST_JAR="$JAVA_SHARE/hamcrest-core.jar"
LIB_CLASSPATH="$MSGPACK_JAR:$ZSTD_JAR:$OKHTTP_JAR:$OKIO_JAR"

PROTOCOL_SRC="$DEMO_DIR/protocol/src/main/java"
PROTOCOL_TEST_SRC="$DEMO_DIR/protocol/src/test/java"
APP_SRC="$DEMO_DIR/app/src/main/java"
HOST_BUILD="$DEMO_DIR/build/host"

die() {
    echo "error: $*" >&2
    exit 1
}

# require FILE WHAT: fail with a clear message naming the missing piece and the fix.
require() {
    [ -e "$1" ] || die "$2 is missing ($1). Run scripts/setup_java.sh first (it installs the Debian packages and fetches android.jar and the ExecuTorch classes)."
}

require_tools() {
    command -v javac >/dev/null 2>&1 || die "javac not found: run scripts/setup_java.sh (installs default-jdk-headless)"
    command -v java >/dev/null 2>&1 || die "java not found: run scripts/setup_java.sh (installs default-jdk-headless)"
}

require_libs() {
    require "$MSGPACK_JAR" "msgpack-core (Debian libmsgpack-java)"
    require "$ZSTD_JAR" "zstd-jni (Debian libzstd-jni-java)"
    require "$OKHTTP_JAR" "OkHttp (Debian libokhttp-java)"
    require "$OKIO_JAR" "Okio (Debian libokio-java)"
}

# The Java sources of a directory tree, one per line.
java_sources() {
    find "$@" -name '*.java' | sort
}
