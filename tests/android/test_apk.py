"""The Android demo as an installable APK, built here without Gradle (android_demo/scripts/build_apk.sh).

Nothing Android runs on this machine (no phone, no emulator): these checks are
static. They show that the APK is signed, declares the app and its native
code, carries every native library the ExecuTorch runtime needs, and that
every class, method and field its dex code refers to exists in the APK or in
the Android API (dexdump-level, android_demo/scripts/dexcheck.py), with the
Java side of the JNI contract (the fbjni classes written in
android_demo/jni-support) present with the names and signatures the native
libraries look up.
"""

import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "android_demo"
APK = DEMO / "build" / "apk" / "spa-demo-debug.apk"
sys.path.insert(0, str(DEMO / "scripts"))
import dexcheck  # noqa: E402

ABIS = ("arm64-v8a", "x86_64")
# No libc++_shared.so: one C++ runtime, libexecutorch.so's (build_apk.sh; test_one_cpp_runtime_in_the_process)
NATIVE_LIBS = ("libexecutorch.so", "libfbjni.so")
PAGE_16K = 0x4000
# Libraries still aligned below 16 KB, and why: no build aligned to 16 KB is in a registry reachable
# here (android_demo/README.md, "16 KB pages"). The app refuses to load them on a 16 KB-page phone,
# saying so in one line (org.spa.demo.core.NativeLibraries.pageSizeProblem).
BELOW_16K = {"libfbjni.so": "react-native 0.70.15's fbjni 0.2.2 (NDK r21); newer fbjni builds live only on Maven"}
# The Android NDK's stable system libraries a packaged library may need (on every phone).
SYSTEM_LIBS = {"libc.so", "libm.so", "libdl.so", "liblog.so", "libandroid.so", "libz.so", "libGLESv2.so",
               "libEGL.so", "libjnigraphics.so", "libvulkan.so", "libmediandk.so", "libOpenSLES.so"}

# References that android.jar API 23 lacks but every phone the app installs on (minSdk 26) has,
# or that a library only probes. Anything else unresolved fails the test.
ALLOWED = [
    (r"class java/time/\w+|method Ljava/util/Date;\.toInstant\(\)Ljava/time/Instant;", "java.time: API 26 (= minSdk)"),
    (r"class java/nio/file/\w+", "java.nio.file: API 26 (= minSdk); okio's Path helpers"),
    (r"method Ljava/lang/Math;\.(addExact|floorDiv|floorMod|multiplyExact)\(", "Math exact arithmetic: API 24"),
    (r"class sun/misc/Unsafe|class sun/nio/ch/DirectBuffer",
     "in Android's core library, not in the SDK's android.jar; msgpack-core checks at run time and falls back"),
]
STRICT_PACKAGES = ("org/spa/", "com/facebook/", "org/pytorch/")  # ours, the JNI glue and ExecuTorch: nothing may be missing


def _explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n--- stderr\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def apk() -> Path:
    proc = subprocess.run([str(DEMO / "scripts" / "build_apk.sh")], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, _explain(proc)
    print(proc.stdout)  # the APK's size and contents (pytest -s shows them)
    assert APK.is_file()
    return APK


@pytest.fixture(scope="module")
def android_jar() -> Path:
    from os import environ

    cache = Path(environ.get("SPA_ANDROID_CACHE") or Path(environ.get("SPA_CACHE_DIR", Path.home() / ".cache" / "spa")) / "android")
    return cache / "android-23.jar"


@pytest.fixture(scope="module")
def dex(apk, android_jar):
    """(classes defined in the dex, the dexcheck report)."""
    with zipfile.ZipFile(apk) as z, __import__("tempfile").TemporaryDirectory() as tmp:
        path = Path(tmp) / "classes.dex"
        path.write_bytes(z.read("classes.dex"))
        dump = subprocess.run(["dexdump", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    classes, _ = dexcheck.dex_model(dump)
    return classes, dexcheck.check(apk, android_jar, android_jar.parent)


def test_apk_is_signed(apk):
    proc = subprocess.run(["apksigner", "verify", "--verbose", str(apk)], capture_output=True, text=True)
    assert proc.returncode == 0, _explain(proc)
    assert "Verified using v2 scheme (APK Signature Scheme v2): true" in proc.stdout, proc.stdout


def test_badging_shows_the_app_its_launcher_activity_and_native_code(apk):
    proc = subprocess.run(["aapt", "dump", "badging", str(apk)], capture_output=True, text=True)
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout
    assert re.search(r"^package: name='org\.spa\.demo' versionCode='\d+' versionName='[^']+'", out, re.M), out
    assert "launchable-activity: name='org.spa.demo.MainActivity'" in out
    assert "sdkVersion:'26'" in out
    native = re.search(r"^native-code: (.*)$", out, re.M).group(1)
    assert "'arm64-v8a'" in native and "'x86_64'" in native  # phones, and the x86_64 emulator
    assert re.search(r"^application: label='SPA Reader' icon='res/\S+ic_launcher\.xml'", out, re.M), out
    assert "uses-permission: name='android.permission.INTERNET'" in out


def _activities(apk) -> dict[str, str]:
    """The xmltree text of each <activity> of the APK's manifest, by name."""
    proc = subprocess.run(["aapt", "dump", "xmltree", str(apk), "AndroidManifest.xml"], capture_output=True, text=True)
    assert proc.returncode == 0, _explain(proc)
    blocks = re.split(r"\n\s+E: activity ", proc.stdout)[1:]
    return {re.search(r'android:name\([^)]*\)="([^"]+)"', b).group(1): b for b in blocks}


def test_manifest_fixes_for_the_first_minutes_on_a_phone(apk):
    acts = _activities(apk)
    bench, main = acts[".BenchmarkActivity"], acts[".MainActivity"]
    # benchmark mode loads a .pte and writes a file: only adb's shell (which holds DUMP) may start it
    assert 'android:permission(0x01010006)="android.permission.DUMP"' in bench
    # rotation keeps the activity (and the session lives outside it anyway)
    for block in (main, bench):
        flags = int(re.search(r"android:configChanges\(0x0101001f\)=\(type 0x11\)0x([0-9a-f]+)", block).group(1), 16)
        assert flags & 0x80 and flags & 0x400, hex(flags)  # orientation, screenSize
    assert 'android:mimeType(0x01010026)="text/*"' in main  # any text type can be shared in
    proc = subprocess.run(["aapt", "dump", "xmltree", str(apk), "AndroidManifest.xml"], capture_output=True, text=True)
    assert "android:networkSecurityConfig" in proc.stdout  # self-signed wss:// via a user-installed CA
    with zipfile.ZipFile(apk) as z:
        config = subprocess.run(["aapt", "dump", "xmltree", str(apk), "res/xml/network_security_config.xml"],
                                capture_output=True, text=True).stdout
        assert 'A: src="user"' in config, config
        assert any(n.startswith("res/mipmap-anydpi-v26/ic_launcher") for n in z.namelist())


def _elf_needed(data: bytes) -> tuple[int, list[str]]:
    """(e_machine, DT_NEEDED names) of a 64-bit little-endian ELF shared library."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    machine = struct.unpack_from("<H", data, 18)[0]
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _flags, off, vaddr, _pa, filesz, _memsz, _align = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            loads.append((vaddr, off, filesz))
        elif p_type == 2:
            dynamic = (off, filesz)
    entries, strtab = [], None
    for k in range(dynamic[1] // 16):
        tag, val = struct.unpack_from("<qQ", data, dynamic[0] + 16 * k)
        if tag == 0:
            break
        entries.append((tag, val))
        if tag == 5:
            strtab = next(off + val - vaddr for vaddr, off, size in loads if vaddr <= val < vaddr + size)
    names = [data[strtab + v: data.index(b"\0", strtab + v)].decode() for t, v in entries if t == 1]
    return machine, names


def test_native_libraries_are_complete_per_abi(apk):
    machines = {"arm64-v8a": 183, "x86_64": 62}  # EM_AARCH64, EM_X86_64
    with zipfile.ZipFile(apk) as z:
        names = set(z.namelist())
        for abi in ABIS:
            packaged = {n.rsplit("/", 1)[1] for n in names if n.startswith(f"lib/{abi}/")}
            assert packaged == set(NATIVE_LIBS), (abi, packaged)
            for lib in packaged:
                machine, needed = _elf_needed(z.read(f"lib/{abi}/{lib}"))
                assert machine == machines[abi], (abi, lib, machine)
                missing = [n for n in needed if n not in packaged and n not in SYSTEM_LIBS]
                assert not missing, f"{abi}/{lib} needs {missing}, neither packaged nor an Android system library"


def _readelf(apk, abi: str, lib: str, *flags: str) -> str:
    with zipfile.ZipFile(apk) as z, __import__("tempfile").TemporaryDirectory() as tmp:
        path = Path(tmp) / lib
        path.write_bytes(z.read(f"lib/{abi}/{lib}"))
        return subprocess.run(["readelf", "-W", *flags, str(path)], capture_output=True, text=True, check=True).stdout


def _load_aligns(apk, abi, lib) -> set[int]:
    return {int(line.split()[-1], 16) for line in _readelf(apk, abi, lib, "-l").splitlines()
            if line.strip().startswith("LOAD")}


def test_native_libraries_are_aligned_for_16_kb_pages_or_named_as_not(apk):
    """Android 15+ phones with 16 KB pages refuse a library whose LOAD segments are aligned to less.
    Every packaged library is aligned to 16 KB, except the ones BELOW_16K names (and the app checks)."""
    for abi in ABIS:
        for lib in NATIVE_LIBS:
            aligns = _load_aligns(apk, abi, lib)
            assert aligns, (abi, lib)
            if lib in BELOW_16K:
                assert min(aligns) < PAGE_16K, f"{abi}/{lib} is 16 KB-aligned now: drop it from BELOW_16K and the README"
            else:
                assert min(aligns) >= PAGE_16K, (abi, lib, [hex(a) for a in aligns])


def _dynamic_symbols(apk, abi, lib) -> tuple[set[str], set[str]]:
    """(defined and exported, undefined and not weak) dynamic symbols."""
    defined, undefined = set(), set()
    for line in _readelf(apk, abi, lib, "--dyn-syms").splitlines():
        f = line.split()
        if len(f) < 8 or not f[0].endswith(":"):
            continue
        bind, vis, ndx, name = f[4], f[5], f[6], f[7].split("@")[0]
        if ndx == "UND" and bind != "WEAK":
            undefined.add(name)
        elif ndx != "UND" and bind in ("GLOBAL", "WEAK") and vis == "DEFAULT":
            defined.add(name)
    return defined, undefined


BIONIC_CXA = {"__cxa_atexit", "__cxa_finalize", "__cxa_thread_atexit_impl"}  # from Android's libc, not a C++ runtime


def test_one_cpp_runtime_in_the_process(apk):
    """libexecutorch.so carries its C++ runtime and exports it; libfbjni.so, loaded as its dependency
    (ExecuTorch first), must find every C++ runtime symbol it imports there, so no second runtime
    (React Native's libc++_shared.so) is packaged or named."""
    cxx = re.compile(r"^(_Z|__cxa_|__gxx_|_Unwind_|__dynamic_cast)")
    for abi in ABIS:
        _, et_needed = _elf_needed_of(apk, abi, "libexecutorch.so")
        assert "libfbjni.so" in et_needed, (abi, et_needed)  # fbjni loads in ExecuTorch's load group
        _, fb_needed = _elf_needed_of(apk, abi, "libfbjni.so")
        assert not any("c++" in n for n in fb_needed), (abi, fb_needed)
        et_defined, _ = _dynamic_symbols(apk, abi, "libexecutorch.so")
        _, fb_undefined = _dynamic_symbols(apk, abi, "libfbjni.so")
        wanted = {s for s in fb_undefined if cxx.match(s) and s not in BIONIC_CXA}
        assert len(wanted) > 20, (abi, sorted(wanted))  # fbjni does use the C++ runtime
        assert wanted <= et_defined, (abi, sorted(wanted - et_defined))


def _elf_needed_of(apk, abi, lib):
    with zipfile.ZipFile(apk) as z:
        return _elf_needed(z.read(f"lib/{abi}/{lib}"))


def test_the_library_name_executorch_loads_is_packaged(dex, apk):
    """ExecuTorch's Java classes call NativeLoader.loadLibrary("<name>") -> System.loadLibrary -> lib<name>.so."""
    with zipfile.ZipFile(apk) as z, __import__("tempfile").TemporaryDirectory() as tmp:
        path = Path(tmp) / "classes.dex"
        path.write_bytes(z.read("classes.dex"))
        dump = subprocess.run(["dexdump", "-d", str(path)], capture_output=True, text=True, check=True).stdout
        packaged = {n.rsplit("/", 1)[1] for n in z.namelist() if n.startswith("lib/arm64-v8a/")}
    block = dump[dump.index("Class descriptor  : 'Lorg/pytorch/executorch/Module;'"):]
    block = block[:block.index("Class descriptor", 10)]
    clinit = block[block.index("org.pytorch.executorch.Module.<clinit>"):]
    name = re.search(r'const-string v\d+, "([\w.-]+)"[^\n]*\n[^\n]*NativeLoader;\.loadLibrary', clinit).group(1)
    assert f"lib{name}.so" in packaged, (name, packaged)


def _methods(classes, name):
    assert name in classes, f"{name} is not in the APK"
    return set(classes[name]["methods"])


def test_java_side_of_the_jni_contract_is_in_the_apk(dex):
    """What libfbjni.so and libexecutorch.so look up by name (their strings; android_demo/jni-support/README.md)."""
    classes, _ = dex
    fb = "com/facebook/jni/"
    assert "deleteNative(J)V" in _methods(classes, fb + "HybridData$Destructor")
    assert "mNativePointer" in classes[fb + "HybridData$Destructor"]["fields"]
    assert "mDestructor" in classes[fb + "HybridData"]["fields"]
    assert "<init>()V" in _methods(classes, fb + "HybridData")  # native code creates it
    assert {"isValid()Z", "resetNative()V"} <= _methods(classes, fb + "HybridData")
    assert classes[fb + "HybridClassBase"]["super"] == fb + "HybridData"
    assert {"run()V", "<init>(Lcom/facebook/jni/HybridData;)V"} <= _methods(classes, fb + "NativeRunnable")
    assert "mHybridData" in classes[fb + "NativeRunnable"]["fields"]
    assert {"runStdFunction(J)V", "runStdFunctionImpl(J)V"} <= _methods(classes, fb + "ThreadScopeSupport")
    assert "<init>(Ljava/lang/String;)V" in _methods(classes, fb + "CppException")
    assert "<init>(Ljava/lang/String;I)V" in _methods(classes, fb + "CppSystemErrorException")
    assert {"<init>()V", "<init>(Ljava/lang/String;)V"} <= _methods(classes, fb + "UnknownCppException")
    assert "hasNext()Z" in _methods(classes, fb + "MapIteratorHelper")
    assert {"mKey", "mValue"} <= set(classes[fb + "MapIteratorHelper"]["fields"])
    assert "hasNext()Z" in _methods(classes, fb + "IteratorHelper") and "mElement" in classes[fb + "IteratorHelper"]["fields"]
    nl = "com/facebook/soloader/nativeloader/"
    assert {"init(Lcom/facebook/soloader/nativeloader/NativeLoaderDelegate;)V", "isInitialized()Z",
            "loadLibrary(Ljava/lang/String;)Z"} <= _methods(classes, nl + "NativeLoader")
    assert "<init>()V" in _methods(classes, nl + "SystemDelegate")
    assert nl + "NativeLoaderDelegate" in classes[nl + "SystemDelegate"]["interfaces"]


def test_every_dex_reference_resolves_in_the_apk_or_android_23(dex):
    _, report = dex
    assert report["classes"] > 400 and sum(report["references"].values()) > 10000, report["references"]
    assert report["invoke_custom"] == {}, report["invoke_custom"]  # no lambdas / indy string concat left
    strict = {who: items for who, items in report["unresolved"].items() if who.startswith(STRICT_PACKAGES)}
    unexplained = {}
    for who, items in report["unresolved"].items():
        rest = [i for i in items if not any(re.match(f"(?:{p})", i) for p, _ in ALLOWED)]
        if rest:
            unexplained[who] = rest
    assert not any("com/facebook/jni" in i for items in report["unresolved"].values() for i in items)
    assert not unexplained, unexplained
    # ours and the JNI glue: nothing unresolved at all, not even allowed API 24-26 calls
    assert not {w: i for w, i in strict.items() if w.startswith(("org/spa/", "com/facebook/"))}, strict
