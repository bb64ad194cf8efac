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
# fbjni / NativeLoader Java classes for the APK built without Gradle (android_demo/jni-support/README.md)
JNI_SUPPORT_SRC="$DEMO_DIR/jni-support/src/main/java"
JNI_SUPPORT_TEST_SRC="$DEMO_DIR/jni-support/src/test/java"
# The app's Android-free logic (org.spa.demo.core) and its JUnit tests: they run on the host JVM
APP_CORE_SRC="$APP_SRC/org/spa/demo/core"
APP_TEST_SRC="$DEMO_DIR/app/src/test/java"
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

# bullseye_download PACKAGE: fetch PACKAGE's .deb from Debian bullseye with `apt-get download`
# through a private sources list, state and cache (the system's apt configuration is not
# touched); prints the .deb's path (in a temporary folder the caller removes).
bullseye_download() {
    local pkg="$1" apt_dir uri deb
    apt_dir="$(mktemp -d)"
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/debs"
    touch "$apt_dir/status"
    uri=""
    if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
        uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' /etc/apt/sources.list.d/*.sources | grep -v security | head -1)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' /etc/apt/sources.list | grep -v security | head -1)
    fi
    [ -n "$uri" ] || die "cannot find a Debian mirror in the apt configuration to fetch $pkg from"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri bullseye main" > "$apt_dir/sources.list"
    local opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
                -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::State::Status=$apt_dir/status"
                -o "Dir::Cache=$apt_dir" -o "Dir::Cache::archives=$apt_dir/archives"
                -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
    apt-get "${opts[@]}" update >"$apt_dir/log" 2>&1 || { cat "$apt_dir/log" >&2; die "apt-get update (bullseye) failed"; }
    (cd "$apt_dir/debs" && apt-get "${opts[@]}" download "$pkg" >>"$apt_dir/log" 2>&1) \
        || { cat "$apt_dir/log" >&2; die "apt-get download $pkg (bullseye) failed"; }
    deb=$(ls "$apt_dir/debs/${pkg}"_*.deb 2>/dev/null | head -1)
    [ -n "$deb" ] || die "apt-get download $pkg produced no .deb (is Debian bullseye still on the mirror?)"
    echo "$deb"
}

# Quiet runs and Debian installs, for the scripts that set things up (setup_java.sh, build_apk.sh).
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
run_logged() { # run a command quietly; on failure show the end of its output and stop
    if ! "$@" >>"$LOG" 2>&1; then
        tail -50 "$LOG" >&2
        die "'$*' failed (output above)"
    fi
}
as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo "$@"
    else die "need root to run: $* (or install those Debian packages yourself)"
    fi
}
apt_install_missing() { # install those of the named Debian packages that are not installed yet
    local missing="" p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install these Debian packages:$missing"
    run_logged as_root apt-get update -qq
    run_logged as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
}
