"""Imports inside mistralpy/ point down the layer order of docs/ARCHITECTURE.md, never up.

Every import counts, including lazy ones inside functions and TYPE_CHECKING blocks: a lazy
upward import is still an upward dependency.
"""

import ast
import re
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mistralpy"


def layer_lines() -> list[tuple[list[str], str]]:
    """The layer-order block of ARCHITECTURE.md, lowest first: (module prefixes, the notes in
    parentheses that name the layer's modules) per line."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"Order of layers.*?```\n(.*?)```", doc, re.S)
    assert block, "ARCHITECTURE.md lost its layer-order block"
    lines = []
    for line in block.group(1).splitlines():
        names, _, notes = line.strip().partition("  ")
        if names:
            lines.append(([n.strip() for n in names.split(",")], notes.strip().strip("()")))
    return lines


def layer_order() -> list[list[str]]:
    """Layers lowest first, each a list of module prefixes."""
    return [prefixes for prefixes, _ in layer_lines()]


def layer_prefixes() -> set[str]:
    return {p for prefixes in layer_order() for p in prefixes}


def named_modules(prefixes: list[str], notes: str) -> set[str]:
    """The module names a layer's notes list: each item of "(a, b: what b is; c + *.ll)" up
    to its first ':' or ' + ', a leading "pkg: " label of the layer's own packages dropped;
    items of several words are prose."""
    names = set()
    for item in re.split(r"[,;]", notes):
        item = item.strip()
        for prefix in prefixes:
            item = item.removeprefix(f"{prefix}: ")
        name = re.split(r":| \+ ", item)[0].strip()
        if re.fullmatch(r"[a-z_0-9]+", name):
            names.add(name)
    return names


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """Index of the most specific layer prefix matching `module` (e.g. model.config vs model)."""
    rel = module.removeprefix("mistralpy.")
    best, best_len = None, -1
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            if (rel == p or rel.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def reexports(package: Path) -> dict[str, str]:
    """The top-level lazy re-exports, name -> defining module (`_EXPORTS` in __init__.py)."""
    tree = ast.parse((package / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "_EXPORTS":
            return ast.literal_eval(node.value)
    return {}


def _import_module_target(node: ast.Call) -> str | None:
    """The literal module of an `importlib.import_module("...")` / `import_module("...")` call."""
    func = ast.unparse(node.func)
    if func not in ("importlib.import_module", "import_module") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def imports_of(path: Path, module: str, exports: dict[str, str]) -> list[tuple[int, str]]:
    """(line, imported module) for every import of the package in `path`: plain, relative,
    `from mistralpy import X` (a re-export counts as an import of the module defining X) and
    `importlib.import_module` with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                pkg = pkg if is_pkg else pkg[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join([*pkg, base] if base else pkg)
            found.append((node.lineno, base))
            if base == "mistralpy":  # `from mistralpy import model` or a lazy re-export
                found += [
                    (node.lineno, exports.get(a.name, f"{base}.{a.name}")) for a in node.names
                ]
        elif isinstance(node, ast.Call) and (target := _import_module_target(node)):
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name.startswith("mistralpy.")]


def upward_edges(package: Path = PACKAGE) -> list[str]:
    layers = layer_order()
    exports = reexports(package)
    bad = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package)
        if module == "mistralpy":
            continue  # the top-level lazy re-exports sit above every layer
        own = layer_of(module, layers)
        assert own is not None, f"{module} belongs to no layer in ARCHITECTURE.md"
        for line, target in imports_of(path, module, exports):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > own:
                bad.append(f"{path.relative_to(package.parent)}:{line}: {module} imports {target}")
    return bad


def test_layer_order_is_parsed():
    layers = layer_order()
    flat = [p for layer in layers for p in layer]
    assert flat.index("params") < flat.index("kernels") < flat.index("server")


def test_no_upward_imports():
    bad = upward_edges()
    assert not bad, "upward imports:\n" + "\n".join(bad)


PLANTED = """\
import importlib

from mistralpy import Runner
from mistralpy.server import app
from ..engine import engine


def late():
    return importlib.import_module("mistralpy.api.chat")
"""


def test_detects_an_upward_edge(tmp_path):
    """A copy of the package with one kernels module that imports upward four ways: each is
    reported, and the untouched copy has none."""
    copy = tmp_path / "mistralpy"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert upward_edges(copy) == []
    (copy / "kernels" / "planted.py").write_text(PLANTED)
    found = upward_edges(copy)
    where = "mistralpy/kernels/planted.py"
    assert found == [
        f"{where}:3: mistralpy.kernels.planted imports mistralpy.api.runner",
        f"{where}:4: mistralpy.kernels.planted imports mistralpy.server",
        f"{where}:5: mistralpy.kernels.planted imports mistralpy.engine",
        f"{where}:9: mistralpy.kernels.planted imports mistralpy.api.chat",
    ], found


def test_layer_block_names_every_module():
    """Each package's modules are the ones its line of the layer block names: none missing,
    none named that is gone (so a newcomer reading the block sees the whole package)."""
    for prefixes, notes in layer_lines():
        packages = [p for p in prefixes if (PACKAGE / p).is_dir()]
        if not packages:
            continue  # the leaf line names modules, not packages
        have = {
            path.stem
            for p in packages
            for path in (PACKAGE / p).glob("*.py")
            if path.name != "__init__.py" and f"{p}.{path.stem}" not in layer_prefixes()
        }
        named = named_modules(prefixes, notes)
        assert have == named, (prefixes, "unnamed:", have - named, "gone:", named - have)
