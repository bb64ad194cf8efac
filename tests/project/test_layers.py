"""The layers a reader can see, checked on the source with `ast` (nothing is imported or run).

core `spa/`  <-  role folders (training, export, cloud_gateway, device_runtime, evaluation, benchmarks)  <-  `cli/`

* the core imports no role folder and not the command line;
* no role folder imports the command line;
* no module imports another project module's private (`_name`) names,
  neither as `from x import _y` nor as `x._y` on an imported project module.

Imports inside functions count as much as those at the top of a file: the
handlers of the command line import lazily, and so could anything else.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = "spa"
CLI = "cli"
ROLES = ("cloud_gateway", "device_runtime", "export", "training", "evaluation", "benchmarks")
PROJECT = (CORE, CLI, *ROLES, "tests")


def python_files(*folders: str) -> list[Path]:
    files = [f for folder in folders for f in sorted((ROOT / folder).rglob("*.py"))]
    assert files, f"no Python files under {folders}"
    return files


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str, ast.ImportFrom | ast.Import]]:
    """(line, absolute module name, node) for every import in the file, at any depth."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the file's own package upwards
                base = package[:len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((node.lineno, name, node))
    return found


def top(name: str) -> str:
    return name.split(".")[0]


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def is_project_module(name: str) -> bool:
    if top(name) not in PROJECT:
        return False
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_the_core_imports_no_role_folder_and_not_the_command_line():
    above = set(ROLES) | {CLI}
    bad = [f"{where(path, line)} imports {name}" for path in python_files(CORE)
           for line, name, _ in imports(path) if top(name) in above]
    assert not bad, ("the core (spa/) must not import a role folder or cli/:\n" + "\n".join(bad))


def test_no_role_folder_imports_the_command_line():
    bad = [f"{where(path, line)} imports {name}" for path in python_files(*ROLES)
           for line, name, _ in imports(path) if top(name) == CLI]
    assert not bad, "role folders must not import cli/ (the command line sits above them):\n" + "\n".join(bad)


def module_aliases(path: Path) -> dict[str, str]:
    """Local names bound to project modules: `import a.b as z` -> {z: a.b}, `import a.b` -> {a: a},
    `from a import b` -> {b: a.b} (when a/b is a module)."""
    aliases = {}
    for _, name, node in imports(path):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == name and is_project_module(name):
                    aliases[alias.asname or top(name)] = name if alias.asname else top(name)
        elif name:
            for alias in node.names:
                if is_project_module(f"{name}.{alias.name}"):
                    aliases[alias.asname or alias.name] = f"{name}.{alias.name}"
    return aliases


def dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as ["a", "b", "c"]; None for anything that is not a chain of names."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return None if base is None else [*base, node.attr]
    return None


def private_uses(path: Path) -> list[str]:
    own = module_name(path)
    bad = []
    for line, name, node in imports(path):
        if isinstance(node, ast.ImportFrom) and name and top(name) in PROJECT and name != own:
            bad += [f"{where(path, line)}: from {name} import {a.name}" for a in node.names if private(a.name)]
    aliases = module_aliases(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain = dotted(node.value)
            if chain and chain[0] in aliases:
                module = ".".join([aliases[chain[0]], *chain[1:]])
                if module != own and is_project_module(module):
                    bad.append(f"{where(path, node.lineno)}: {'.'.join(chain)}.{node.attr} (module {module})")
    return bad


def test_no_module_reaches_for_another_modules_private_names():
    bad = [use for path in python_files(*PROJECT) for use in private_uses(path)]
    assert not bad, "private names used across modules (make them public where they are defined):\n" + "\n".join(bad)


def test_the_checks_see_what_they_look_for(tmp_path, monkeypatch):
    """The checks themselves: a lazy import, a relative import and a module attribute are all caught."""
    folder = tmp_path / "spa"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "helper.py").write_text("_secret = 1\n")
    sample = folder / "sample.py"
    sample.write_text("import spa.helper as h\nfrom . import helper\n\n\ndef f():\n"
                      "    from benchmarks.link import x\n    from .helper import _secret\n"
                      "    return h._secret + helper._secret\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [(line, name) for line, name, _ in imports(sample)] == [
        (1, "spa.helper"), (2, "spa"), (6, "benchmarks.link"), (7, "spa.helper")]
    uses = private_uses(sample)
    assert len(uses) == 3 and all("_secret" in use for use in uses), uses


def test_the_wire_protocol_imports_no_torch():
    """spa/protocol is sans-I/O and model-free (a Java or phone client's equivalent needs no tensor
    library): no file there imports torch or the model package, and importing all of it loads no torch."""
    bad = [f"{where(path, line)} imports {name}" for path in python_files("spa/protocol")
           for line, name, _ in imports(path) if top(name) == "torch" or name.startswith("spa.model")]
    assert not bad, "spa/protocol must not import torch or spa.model:\n" + "\n".join(bad)
    modules = [module_name(path) for path in python_files("spa/protocol")]
    code = "import sys\n" + "".join(f"import {name}\n" for name in modules) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", "importing spa/protocol loaded torch"
