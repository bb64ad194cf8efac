#!/usr/bin/env bash
# Install what the Android demo's scripts need (idempotent; quiet on success):
#   * Debian packages: a JDK, JUnit 4, msgpack-core, OkHttp + Okio, zstd-jni (android_demo/scripts/host_test.sh);
#   * android.jar API 23, from Debian bullseye's libandroid-23-java, fetched with `apt-get download`
#     through a private sources list (the system's apt configuration is not touched);
#   * the ExecuTorch Java API classes (org.pytorch.executorch), from the npm package
#     react-native-executorch@0.9.3 (android/libs/classes.jar), for android_demo/scripts/compile_app.sh.
# Downloads are cached under ${SPA_CACHE_DIR:-~/.cache/spa}/android, so reruns are fast.
set -euo pipefail
. "$(dirname "$0")/../android_demo/scripts/common.sh"


# --- Debian packages -----------------------------------------------------------------
PACKAGES="default-jdk-headless junit4 libhamcrest-java libmsgpack-java libokhttp-java libokio-java libzstd-jni-java libzstd-jni1"
apt_install_missing $PACKAGES
require_tools
require_libs
require "$JUNIT_JAR" "JUnit 4 (Debian junit4)"
require "$HAMCREST_JAR" "Hamcrest (Debian libhamcrest-java)"

mkdir -p "$ANDROID_CACHE"

# --- android.jar (API 23) from Debian bullseye ---------------------------------------
# The only Debian release that packages an Android API jar. We reuse the mirror the
# system's apt already uses, with a sources list, state and cache of our own.
debian_mirror() {
    local uri=""
    if ls /etc/apt/sources.list.d/*.sources >/dev/null 2>&1; then
        uri=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) print $i}' /etc/apt/sources.list.d/*.sources | grep -v security | head -1)
    fi
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; break}}' /etc/apt/sources.list | grep -v security | head -1)
    fi
    [ -n "$uri" ] || die "cannot find a Debian mirror in the apt configuration to fetch libandroid-23-java from"
    echo "$uri"
}

if [ ! -s "$ANDROID_JAR" ]; then
    APT_DIR="$ANDROID_CACHE/apt"
    mkdir -p "$APT_DIR/lists/partial" "$APT_DIR/archives/partial" "$APT_DIR/debs"
    touch "$APT_DIR/status"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(debian_mirror) bullseye main" > "$APT_DIR/sources.list"
    APT_OPTS=(-o "Dir::Etc::SourceList=$APT_DIR/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
              -o "Dir::State::Lists=$APT_DIR/lists" -o "Dir::State::Status=$APT_DIR/status"
              -o "Dir::Cache=$APT_DIR" -o "Dir::Cache::archives=$APT_DIR/archives"
              -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
    run_logged apt-get "${APT_OPTS[@]}" update
    (cd "$APT_DIR/debs" && run_logged apt-get "${APT_OPTS[@]}" download libandroid-23-java)
    DEB=$(ls "$APT_DIR"/debs/libandroid-23-java_*.deb 2>/dev/null | head -1)
    [ -n "$DEB" ] || die "apt-get download libandroid-23-java produced no .deb (is Debian bullseye still on the mirror?)"
    EXTRACT="$(mktemp -d)"
    run_logged dpkg-deb -x "$DEB" "$EXTRACT"
    [ -s "$EXTRACT/usr/share/java/com.android.android-23.jar" ] || die "$DEB holds no com.android.android-23.jar"
    cp "$EXTRACT/usr/share/java/com.android.android-23.jar" "$ANDROID_JAR.tmp" && mv "$ANDROID_JAR.tmp" "$ANDROID_JAR"
    rm -rf "$EXTRACT" "$APT_DIR" # the package lists are only needed once
fi

# --- ExecuTorch Java classes from the npm package ---------------------------------------
if [ ! -s "$EXECUTORCH_JAR" ]; then
    command -v npm >/dev/null 2>&1 || die "npm not found: it fetches $EXECUTORCH_NPM (apt-get install npm)"
    WORK="$(mktemp -d)"
    (cd "$WORK" && run_logged npm pack --silent "$EXECUTORCH_NPM")
    TGZ=$(ls "$WORK"/react-native-executorch-*.tgz 2>/dev/null | head -1)
    [ -n "$TGZ" ] || die "npm pack $EXECUTORCH_NPM produced no tarball"
    run_logged tar -xzf "$TGZ" -C "$WORK" package/android/libs/classes.jar
    CLASSES="$WORK/package/android/libs/classes.jar"
    # (the JDK's `jar`, installed above; a listing in a variable, since `... | grep -q` fails under pipefail)
    LISTING=$(jar tf "$CLASSES" 2>/dev/null || true)
    case "$LISTING" in *org/pytorch/executorch/Module.class*) ;; *) die "$EXECUTORCH_NPM's android/libs/classes.jar has no org.pytorch.executorch.Module" ;; esac
    cp "$CLASSES" "$EXECUTORCH_JAR.tmp" && mv "$EXECUTORCH_JAR.tmp" "$EXECUTORCH_JAR"
    rm -rf "$WORK"
fi
