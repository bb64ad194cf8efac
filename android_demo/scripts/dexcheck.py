#!/usr/bin/env python3
"""Does every class, method and field the code in an APK refers to exist on the phone?

Reads the APK's classes*.dex through `dexdump -d` (Debian's dexdump) and the
platform's API from android.jar (API 23; the app's minSdk is 26, so anything
found in API 23 is on every phone the app installs on). A reference resolves
when its class is defined in the APK or in android.jar and, for a method or a
field, when that class, a superclass or a superinterface declares it, as the
VM resolves it. Also reported: invoke-custom / invoke-polymorphic (dx emits them
for Java 8 lambdas and Java 9 string concatenation; Android has no
LambdaMetafactory nor StringConcatFactory).

    python3 android_demo/scripts/dexcheck.py APK --android-jar android-23.jar [--json OUT]

Prints a summary and, per referencing package, the unresolved references. Exit
status 0 whatever it finds (the caller decides what is acceptable), 2 on usage
errors. Standard library only (runs with any python3).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections import defaultdict
from pathlib import Path

# --- android.jar: a class index (name -> super, interfaces, methods, fields) ---------------


def _parse_class(data: bytes) -> tuple[str, dict]:
    """(internal name, {super, interfaces, methods, fields}) of one class file."""
    if data[:4] != b"\xca\xfe\xba\xbe":
        raise ValueError("not a class file")
    count = struct.unpack_from(">H", data, 8)[0]
    pool: list = [None] * count
    i, pos = 1, 10
    while i < count:
        tag = data[pos]
        if tag == 1:
            (n,) = struct.unpack_from(">H", data, pos + 1)
            pool[i] = data[pos + 3: pos + 3 + n].decode("utf-8", "replace")
            pos += 3 + n
        elif tag in (3, 4):
            pos += 5
        elif tag in (5, 6):
            pos += 9
            i += 1
        elif tag in (7, 8, 16, 19, 20):
            pool[i] = ("ref", struct.unpack_from(">H", data, pos + 1)[0]) if tag == 7 else None
            pos += 3
        elif tag in (9, 10, 11, 12, 17, 18):
            pos += 5
        elif tag == 15:
            pos += 4
        else:
            raise ValueError(f"constant pool tag {tag}")
        i += 1

    def cls(index: int) -> str | None:
        return pool[pool[index][1]] if index else None

    _access, this, sup, n_if = struct.unpack_from(">HHHH", data, pos)
    pos += 8
    interfaces = [cls(struct.unpack_from(">H", data, pos + 2 * k)[0]) for k in range(n_if)]
    pos += 2 * n_if
    members = {}
    for kind in ("fields", "methods"):
        (n,) = struct.unpack_from(">H", data, pos)
        pos += 2
        out = []
        for _ in range(n):
            _acc, name, desc, n_attr = struct.unpack_from(">HHHH", data, pos)
            pos += 8
            for _ in range(n_attr):
                (length,) = struct.unpack_from(">I", data, pos + 2)
                pos += 6 + length
            out.append((pool[name], pool[desc]))
        members[kind] = out
    return cls(this), {"super": cls(sup), "interfaces": interfaces,
                       "methods": sorted(f"{n}{d}" for n, d in members["methods"]),
                       "fields": sorted(n for n, _ in members["fields"])}


def jar_index(jar: Path, cache_dir: Path | None = None) -> dict:
    """The class index of a jar, cached as JSON beside it (keyed by the jar's size and mtime)."""
    st = jar.stat()
    key = hashlib.sha256(f"{jar.resolve()}:{st.st_size}:{st.st_mtime_ns}:1".encode()).hexdigest()[:16]
    cache = (cache_dir or jar.parent) / f"{jar.stem}.index-{key}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    index = {}
    with zipfile.ZipFile(jar) as z:
        for name in z.namelist():
            if name.endswith(".class") and not name.startswith("META-INF/"):
                cname, info = _parse_class(z.read(name))
                index[cname] = info
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(index))
    os.replace(tmp, cache)
    return index


# --- the APK's dex: definitions and references --------------------------------------------

_DESC = r"(\[*L[^;]+;|\[+[ZBSCIJFD])"
_METHOD_REF = re.compile(r"\|[0-9a-f]{4}: (invoke-[a-z/-]+) \{[^}]*\}, " + _DESC + r"\.([^:]+):(\S+) // method@")
_FIELD_REF = re.compile(r"\|[0-9a-f]{4}: ([is](?:get|put)[a-z-]*) [^,]+(?:, [^,]+)?, (L[^;]+;)\.([^:]+):(\S+) // field@")
_TYPE_REF = re.compile(r"\|[0-9a-f]{4}: (new-instance|const-class|check-cast|instance-of|new-array|filled-new-array[a-z/]*) "
                       r"[^/]*?, (\S+) // type@")
_CUSTOM = re.compile(r"\|[0-9a-f]{4}: (invoke-custom[a-z/]*|invoke-polymorphic[a-z/]*) ")
_CATCH = re.compile(r"^\s+(L[^;]+;) -> 0x")
_CODE_OWNER = re.compile(r"\|\[[0-9a-f]+\] ([\w$.]+)\.([^:.]+):")


def _internal(desc: str) -> str | None:
    """Internal class name of a type descriptor (element type for arrays); None for primitives."""
    desc = desc.lstrip("[")
    return desc[1:-1] if desc.startswith("L") else None


def dex_model(dump: str) -> tuple[dict, list]:
    """(classes defined in the dex, references made by their code) from `dexdump -d` text."""
    classes: dict[str, dict] = {}
    refs: list[tuple[str, str, str, str, str]] = []  # (referencing class, kind, class, member, signature)
    current = None
    section = None
    member_name = None
    owner = None
    for line in dump.splitlines():
        if line.startswith("  Class descriptor  : '"):
            current = line.split("'")[1][1:-1]
            classes[current] = {"super": None, "interfaces": [], "methods": [], "fields": []}
            section = None
            continue
        if current is None:
            continue
        c = classes[current]
        if line.startswith("  Superclass        : '"):
            c["super"] = line.split("'")[1][1:-1]
        elif line.startswith("  Interfaces        -"):
            section = "interfaces"
        elif line.startswith(("  Static fields     -", "  Instance fields   -")):
            section = "fields"
        elif line.startswith(("  Direct methods    -", "  Virtual methods   -")):
            section = "methods"
        elif line.startswith("  source_file_idx"):
            section = None
        elif section == "interfaces" and line.startswith("    #"):
            c["interfaces"].append(line.split("'")[1][1:-1])
        elif section in ("fields", "methods") and line.startswith("      name          : '"):
            member_name = line.split("'")[1]
        elif section in ("fields", "methods") and line.startswith("      type          : '") and member_name:
            if section == "fields":
                c["fields"].append(member_name)
            else:
                c["methods"].append(member_name + line.split("'")[1])
            member_name = None
        elif "|[" in line:
            m = _CODE_OWNER.search(line)
            owner = m.group(1).replace(".", "/") if m else current
        elif "|" in line and ": " in line:
            who = owner or current
            if m := _CUSTOM.search(line):
                refs.append((who, "invoke-custom", m.group(1), "", ""))
            elif m := _METHOD_REF.search(line):
                refs.append((who, "method", m.group(2), m.group(3), m.group(4)))
            elif m := _FIELD_REF.search(line):
                refs.append((who, "field", m.group(2)[1:-1], m.group(3), m.group(4)))
            elif m := _TYPE_REF.search(line):
                refs.append((who, "class", m.group(2), "", ""))
        elif m := _CATCH.match(line):
            refs.append((owner or current, "class", m.group(1), "", ""))
    return classes, refs


class Resolver:
    def __init__(self, *indexes: dict):
        self.indexes = indexes

    def cls(self, name: str) -> dict | None:
        for index in self.indexes:
            if name in index:
                return index[name]
        return None

    def _lookup(self, name: str, kind: str, member: str, seen: set) -> bool:
        if name is None or name in seen:
            return False
        seen.add(name)
        info = self.cls(name)
        if info is None:
            return False
        if member in info[kind]:
            return True
        if self._lookup(info["super"], kind, member, seen):
            return True
        return any(self._lookup(i, kind, member, seen) for i in info["interfaces"])

    def method(self, owner_desc: str, name: str, sig: str) -> bool:
        if owner_desc.startswith("["):  # arrays: clone() and Object's methods
            return name == "clone" or self._lookup("java/lang/Object", "methods", name + sig, set())
        owner = _internal(owner_desc)
        if self._lookup(owner, "methods", name + sig, set()):
            return True
        if name in ("invoke", "invokeExact") and owner == "java/lang/invoke/MethodHandle":
            return True  # signature-polymorphic
        return False

    def field(self, owner: str, name: str) -> bool:
        return self._lookup(owner, "fields", name, set())


def check(apk: Path, android_jar: Path, cache_dir: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="dexcheck-") as tmp, zipfile.ZipFile(apk) as z:
        dexes = sorted(n for n in z.namelist() if re.fullmatch(r"classes\d*\.dex", n))
        if not dexes:
            raise SystemExit(f"{apk}: no classes.dex")
        dump = ""
        for name in dexes:
            path = Path(tmp) / name
            path.write_bytes(z.read(name))
            proc = subprocess.run(["dexdump", "-d", str(path)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"dexdump {name} failed: {proc.stderr.strip()[-500:]}")
            dump += proc.stdout
    classes, refs = dex_model(dump)
    platform = jar_index(android_jar, cache_dir)
    resolver = Resolver(classes, platform)
    unresolved: dict[str, set] = defaultdict(set)
    customs: dict[str, int] = defaultdict(int)
    counted = defaultdict(int)
    for who, kind, owner, member, sig in refs:
        counted[kind] += 1
        if kind == "invoke-custom":
            customs[who] += 1
            continue
        cls = _internal(owner) if kind != "field" else owner
        if cls is not None and resolver.cls(cls) is None:
            unresolved[who].add(f"class {cls}")
        elif kind == "method" and not resolver.method(owner, member, sig):
            unresolved[who].add(f"method {owner}.{member}{sig}")
        elif kind == "field" and not resolver.field(owner, member):
            unresolved[who].add(f"field {owner}.{member}")
    # superclasses and interfaces of the APK's classes must resolve too
    for name, info in classes.items():
        for parent in [info["super"], *info["interfaces"]]:
            if parent and resolver.cls(parent) is None:
                unresolved[name].add(f"class {parent} (supertype)")
    return {
        "apk": str(apk),
        "dex_files": dexes,
        "classes": len(classes),
        "references": dict(counted),
        "invoke_custom": dict(customs),
        "unresolved": {k: sorted(v) for k, v in sorted(unresolved.items())},
    }


def by_package(report: dict, depth: int = 2) -> dict[str, list[str]]:
    """The unresolved references grouped by the referencing class's first `depth` package parts."""
    out: dict[str, set] = defaultdict(set)
    for who, items in report["unresolved"].items():
        out["/".join(who.split("/")[:depth])].update(items)
    return {k: sorted(v) for k, v in sorted(out.items())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("apk", type=Path)
    ap.add_argument("--android-jar", type=Path, required=True)
    ap.add_argument("--cache-dir", type=Path, default=None, help="where the android.jar index is cached")
    ap.add_argument("--json", type=Path, default=None, help="write the full report here")
    args = ap.parse_args(argv)
    if not args.apk.is_file() or not args.android_jar.is_file():
        print("dexcheck: no such APK or android.jar", file=sys.stderr)
        return 2
    report = check(args.apk, args.android_jar, args.cache_dir)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    refs = report["references"]
    print(f"dexcheck: {report['classes']} classes in {', '.join(report['dex_files'])}; "
          f"{sum(refs.values())} references checked ({', '.join(f'{v} {k}' for k, v in sorted(refs.items()))})")
    print(f"dexcheck: invoke-custom/polymorphic sites: {sum(report['invoke_custom'].values())}")
    groups = by_package(report)
    if not groups:
        print("dexcheck: every reference resolves in the APK or android.jar")
    for pkg, items in groups.items():
        print(f"dexcheck: {pkg}: {len(items)} unresolved")
        for item in items:
            print(f"    {item}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
