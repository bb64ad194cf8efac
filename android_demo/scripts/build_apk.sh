#!/usr/bin/env bash
# Build a signed debug APK of the Android demo WITHOUT Gradle, only from registry packages:
#
#   Debian bookworm  aapt, zipalign, apksigner, android-framework-res, dexdump, proguard-cli, libasm-java
#                    (+ what scripts/setup_java.sh installs: JDK 17, msgpack-core, OkHttp, Okio, zstd-jni)
#   Debian bullseye  libandroid-23-java (android.jar API 23, via setup_java.sh) and dalvik-exchange (dx),
#                    fetched with `apt-get download` through a private sources list
#   npm              react-native-executorch@0.9.3: org.pytorch.executorch classes + libexecutorch.so
#                    react-native@0.70.15: libfbjni.so (in its release AAR; its libc++_shared.so is not needed)
#
# Steps: the ExecuTorch classes (Java 11, nestmates) are retargeted to Java 8 by an ASM pass of
# ours (android_demo/tools); OkHttp's lambdas are rewritten by `proguard -target 1.7`; the app,
# the protocol module and the fbjni/NativeLoader Java classes (android_demo/jni-support, written
# here) are compiled against android.jar API 23; dx makes classes.dex; aapt packages the manifest
# and resources; the native libraries go to lib/<abi>/; zipalign; apksigner with a debug key kept
# in the cache (so a rebuilt APK installs over the previous one).
#
# Output: android_demo/build/apk/spa-demo-debug.apk (+ dexcheck.json: scripts/dexcheck.py's report).
# Idempotent: downloads are cached under ${SPA_CACHE_DIR:-~/.cache/spa}/android; when the APK is
# newer than every input it only prints its summary. SPA_APK_FORCE=1 rebuilds.
# SPA_APK_ABIS (default "arm64-v8a x86_64": phones, and the x86_64 emulator) picks the ABIs.
#
# Nothing here runs Android: the APK is checked statically (apksigner verify, aapt dump badging,
# dexcheck.py); no phone or emulator exists on the machines this project is built on.
set -euo pipefail
. "$(dirname "$0")/common.sh"
START=$(date +%s)
step() { echo "[$(( $(date +%s) - START )) s] $*"; }

OUT="$DEMO_DIR/build/apk"
APK="$OUT/spa-demo-debug.apk"
ABIS="${SPA_APK_ABIS:-arm64-v8a x86_64}"
RN_NPM=react-native@0.70.15
FRAMEWORK_RES=/usr/share/android-framework-res/framework-res.apk
DX_JAR="$ANDROID_CACHE/dx-10.0.0.jar"
NATIVE="$ANDROID_CACHE/native"
KEYSTORE="$ANDROID_CACHE/debug.keystore"
ASM_JAR="$JAVA_SHARE/asm.jar"
PROGUARD_JAR="$JAVA_SHARE/proguard.jar"
TOOLS_SRC="$DEMO_DIR/tools/src/main/java"
RES_DIR="$DEMO_DIR/app/src/main/res"
MANIFEST="$DEMO_DIR/app/src/main/AndroidManifest.xml"


# --- 1. packages ----------------------------------------------------------------------------
"$REPO_DIR/scripts/setup_java.sh" # JDK, Java libraries, android.jar, ExecuTorch classes.jar
PACKAGES="aapt zipalign apksigner android-framework-res dexdump proguard-cli libasm-java patchelf"
apt_install_missing $PACKAGES
for tool in aapt zipalign apksigner dexdump keytool python3 patchelf; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool not found after installing:$PACKAGES"
done
require "$FRAMEWORK_RES" "framework-res.apk (Debian android-framework-res)"
require "$ASM_JAR" "ASM (Debian libasm-java)"
require "$PROGUARD_JAR" "ProGuard (Debian proguard-cli)"
require "$ANDROID_JAR" "android.jar API 23"
require "$EXECUTORCH_JAR" "the ExecuTorch Java classes"
mkdir -p "$ANDROID_CACHE"

# dx: Debian bullseye's dalvik-exchange (a plain jar; runs on JDK 17).
if [ ! -s "$DX_JAR" ]; then
    DEB=$(bullseye_download dalvik-exchange)
    EXTRACT="$(mktemp -d)"
    run_logged dpkg-deb -x "$DEB" "$EXTRACT"
    [ -s "$EXTRACT/usr/share/java/com.android.dx-10.0.0.jar" ] || die "$DEB holds no com.android.dx-10.0.0.jar"
    cp "$EXTRACT/usr/share/java/com.android.dx-10.0.0.jar" "$DX_JAR.tmp" && mv "$DX_JAR.tmp" "$DX_JAR"
    rm -rf "$EXTRACT" "$(dirname "$(dirname "$DEB")")"
fi

# Native libraries from npm, per ABI: libexecutorch.so (its SONAME is libexecutorch_jni.so; the
# Java classes load it as System.loadLibrary("executorch"), so the file keeps the name
# libexecutorch.so) and libfbjni.so.
npm_tarball() { # npm_tarball SPEC -> path of the cached tarball
    local spec="$1" dir="$ANDROID_CACHE/npm" name
    name="$(echo "$spec" | sed 's/@/-/').tgz"
    if [ ! -s "$dir/$name" ]; then
        command -v npm >/dev/null 2>&1 || die "npm not found: it fetches $spec (apt-get install npm)"
        mkdir -p "$dir"
        (cd "$dir" && run_logged npm pack --silent "$spec")
        [ -s "$dir/$name" ] || die "npm pack $spec produced no $name"
    fi
    echo "$dir/$name"
}
for abi in $ABIS; do
    case "$abi" in arm64-v8a|x86_64) ;; *) die "SPA_APK_ABIS: $abi has no ExecuTorch build in $EXECUTORCH_NPM (arm64-v8a, x86_64)" ;; esac
    if [ ! -s "$NATIVE/$abi/libexecutorch.so" ]; then
        WORK="$(mktemp -d)"
        run_logged tar -xzf "$(npm_tarball "$EXECUTORCH_NPM")" -C "$WORK" "package/third-party/android/libs/executorch/$abi/libexecutorch.so"
        mkdir -p "$NATIVE/$abi"
        mv "$WORK/package/third-party/android/libs/executorch/$abi/libexecutorch.so" "$NATIVE/$abi/libexecutorch.so"
        rm -rf "$WORK"
    fi
    if [ ! -s "$NATIVE/$abi/libfbjni.so" ]; then
        WORK="$(mktemp -d)"
        AAR="package/android/com/facebook/react/react-native/0.70.15/react-native-0.70.15-release.aar"
        run_logged tar -xzf "$(npm_tarball "$RN_NPM")" -C "$WORK" "$AAR"
        run_logged unzip -o -q "$WORK/$AAR" "jni/$abi/libfbjni.so" -d "$WORK/aar"
        mkdir -p "$NATIVE/$abi"
        mv "$WORK/aar/jni/$abi/libfbjni.so" "$NATIVE/$abi/"
        rm -rf "$WORK"
    fi
done

# --- 2. up to date? -------------------------------------------------------------------------
summary() {
    local bytes
    bytes=$(stat -c %s "$APK")
    echo "APK: ${APK#$REPO_DIR/} ($bytes bytes, $((bytes / 1024 / 1024)) MiB)"
    python3 - "$APK" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
rows = sorted(z.infolist(), key=lambda i: -i.file_size)
print(f"  {'stored':>10} {'size':>10}  entry")
for i in rows:
    print(f"  {i.compress_size:>10} {i.file_size:>10}  {i.filename}")
EOF
}
INPUTS=("$PROTOCOL_SRC" "$APP_SRC" "$JNI_SUPPORT_SRC" "$TOOLS_SRC" "$RES_DIR" "$MANIFEST" "$DEMO_DIR/app/build.gradle"
        "$DEMO_DIR/scripts/build_apk.sh" "$DEMO_DIR/scripts/common.sh" "$DEMO_DIR/scripts/dexcheck.py")
if [ -z "${SPA_APK_FORCE:-}" ] && [ -s "$APK" ] && [ -s "$OUT/abis" ] && [ "$(cat "$OUT/abis")" = "$ABIS" ] \
        && [ -z "$(find "${INPUTS[@]}" -newer "$APK" -print -quit)" ]; then
    echo "up to date: ${APK#$REPO_DIR/} (SPA_APK_FORCE=1 rebuilds)"
    summary
    exit 0
fi

# --- 3. Java to dex -------------------------------------------------------------------------
step "packages and downloads ready"
rm -rf "$OUT"
mkdir -p "$OUT/tools" "$OUT/libs" "$OUT/classes" "$OUT/stage"
run_logged javac -encoding UTF-8 -cp "$ASM_JAR" -d "$OUT/tools" $(java_sources "$TOOLS_SRC")
retarget() { # retarget IN OUT [--exclude PREFIX]...
    java -cp "$OUT/tools:$ASM_JAR" org.spa.tools.Retarget "$@" >>"$LOG" 2>&1 || { tail -30 "$LOG" >&2; die "retargeting $1 failed"; }
    step "$(tail -1 "$LOG")"
}
# The ASR extension is Kotlin (needs kotlin-stdlib) and the app does not use it; its natives are
# looked up by name when called, so leaving the classes out breaks nothing else.
retarget "$EXECUTORCH_JAR" "$OUT/libs/executorch.jar" --exclude org/pytorch/executorch/extension/asr/
retarget "$MSGPACK_JAR" "$OUT/libs/msgpack-core.jar"
retarget "$ZSTD_JAR" "$OUT/libs/zstd-jni.jar"
cat > "$OUT/okhttp.pro" <<EOF
-injars $OKHTTP_JAR(!META-INF/**)
-outjars $OUT/libs/okhttp.jar
-libraryjars $ANDROID_JAR
-libraryjars $OKIO_JAR
-target 1.7
-dontshrink
-dontoptimize
-dontobfuscate
-dontpreverify
-dontwarn **
-dontnote **
EOF
run_logged java -jar "$PROGUARD_JAR" @"$OUT/okhttp.pro" # lambdas -> classes
step "proguard: OkHttp 3.13 rewritten for Java 7 (no lambdas)"

LIBS="$OUT/libs/executorch.jar:$OUT/libs/msgpack-core.jar:$OUT/libs/zstd-jni.jar:$OUT/libs/okhttp.jar:$OKIO_JAR"
SOURCES=$(java_sources "$PROTOCOL_SRC" "$APP_SRC" "$JNI_SUPPORT_SRC")
run_logged javac -source 8 -target 8 -Xlint:all -Xlint:-options -Werror -encoding UTF-8 \
    -bootclasspath "$ANDROID_JAR" -cp "$LIBS" -d "$OUT/classes" $SOURCES
step "javac: $(echo "$SOURCES" | wc -l) sources (app, protocol, jni-support) against android.jar API 23"
run_logged java -jar "$DX_JAR" --dex --min-sdk-version=26 --output="$OUT/stage/classes.dex" \
    "$OUT/classes" $(echo "$LIBS" | tr ':' ' ')
step "dx: classes.dex $(stat -c %s "$OUT/stage/classes.dex") bytes"

# --- 4. package, align, sign ----------------------------------------------------------------
VERSION_CODE=$(sed -n "s/^ *versionCode *\([0-9]*\).*/\1/p" "$DEMO_DIR/app/build.gradle" | head -1)
VERSION_NAME=$(sed -n "s/^ *versionName *['\"]\([^'\"]*\)['\"].*/\1/p" "$DEMO_DIR/app/build.gradle" | head -1)
PACKAGE=$(sed -n "s/^ *applicationId *['\"]\([^'\"]*\)['\"].*/\1/p" "$DEMO_DIR/app/build.gradle" | head -1)
[ -n "$VERSION_CODE" ] && [ -n "$VERSION_NAME" ] && [ -n "$PACKAGE" ] || die "cannot read applicationId/versionCode/versionName from app/build.gradle"
# Gradle adds package= from the namespace; aapt needs it in the manifest.
sed "0,/<manifest /s//<manifest package=\"$PACKAGE\" /" "$MANIFEST" > "$OUT/AndroidManifest.xml"
run_logged aapt package -f --debug-mode -M "$OUT/AndroidManifest.xml" -S "$RES_DIR" -I "$FRAMEWORK_RES" \
    --min-sdk-version 26 --target-sdk-version 34 --version-code "$VERSION_CODE" --version-name "$VERSION_NAME" \
    -F "$OUT/unaligned.apk"
# One C++ runtime in the process: libexecutorch.so (NDK r27c) links its C++ runtime statically and
# exports it, and every C++ runtime symbol libfbjni.so imports is among those exports
# (tests/android/test_apk.py checks it). The app loads libfbjni.so only as libexecutorch.so's
# dependency, in one load group (ExecuTorch first: org.spa.demo.core.NativeLibraries), so fbjni
# binds to that runtime. React Native's libc++_shared.so, a second runtime (and 4 KB-aligned), is
# therefore not packaged, and the packaged libfbjni.so no longer names it.
for abi in $ABIS; do
    mkdir -p "$OUT/stage/lib/$abi"
    cp "$NATIVE/$abi/libexecutorch.so" "$NATIVE/$abi/libfbjni.so" "$OUT/stage/lib/$abi/"
    run_logged patchelf --remove-needed libc++_shared.so "$OUT/stage/lib/$abi/libfbjni.so"
done
(cd "$OUT/stage" && run_logged aapt add "$OUT/unaligned.apk" classes.dex $(find lib -type f | sort))
# OkHttp's public suffix list, a Java resource it reads from the class path (not with `aapt add`,
# which would gunzip it and drop the .gz from its name)
python3 - "$OKHTTP_JAR" "$OUT/unaligned.apk" <<'PY'
import sys, zipfile
name = "okhttp3/internal/publicsuffix/publicsuffixes.gz"
data = zipfile.ZipFile(sys.argv[1]).read(name)
with zipfile.ZipFile(sys.argv[2], "a") as apk:
    apk.writestr(zipfile.ZipInfo(name, (2008, 1, 1, 0, 0, 0)), data, compress_type=zipfile.ZIP_STORED)
PY
run_logged zipalign -f -p 4 "$OUT/unaligned.apk" "$OUT/aligned.apk"
if [ ! -s "$KEYSTORE" ]; then # the usual debug key parameters; kept so reinstalls keep the signature
    run_logged keytool -genkeypair -keystore "$KEYSTORE.tmp" -storepass android -keypass android -alias androiddebugkey \
        -keyalg RSA -keysize 2048 -validity 10000 -dname "CN=Android Debug,O=Android,C=US"
    mv "$KEYSTORE.tmp" "$KEYSTORE"
fi
run_logged apksigner sign --ks "$KEYSTORE" --ks-pass pass:android --key-pass pass:android --ks-key-alias androiddebugkey \
    --out "$APK.tmp" "$OUT/aligned.apk"
mv "$APK.tmp" "$APK"
rm -f "$OUT/unaligned.apk" "$OUT/aligned.apk" "$APK.tmp.idsig" "$APK.idsig"
run_logged apksigner verify "$APK"
step "aapt package, native libraries, zipalign, apksigner sign + verify"
echo "$ABIS" > "$OUT/abis"

# --- 5. report ------------------------------------------------------------------------------
python3 "$DEMO_DIR/scripts/dexcheck.py" "$APK" --android-jar "$ANDROID_JAR" --cache-dir "$ANDROID_CACHE" --json "$OUT/dexcheck.json"
echo "built in $(( $(date +%s) - START )) s: $PACKAGE $VERSION_NAME (versionCode $VERSION_CODE), ABIs: $ABIS"
summary
