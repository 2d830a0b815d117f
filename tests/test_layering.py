"""Imports inside mistralpy/ point down the layer order of docs/ARCHITECTURE.md, never up.

Every import counts, including lazy ones inside functions and TYPE_CHECKING blocks: a lazy
upward import is still an upward dependency.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mistralpy"


def layer_order() -> list[list[str]]:
    """Layers lowest first, each a list of module prefixes, read from ARCHITECTURE.md."""
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"Order of layers.*?```\n(.*?)```", doc, re.S)
    assert block, "ARCHITECTURE.md lost its layer-order block"
    layers = []
    for line in block.group(1).splitlines():
        names = re.split(r"\s{2,}", line.strip())[0]
        if names:
            layers.append([n.strip() for n in names.split(",")])
    return layers


def layer_of(module: str, layers: list[list[str]]) -> int | None:
    """Index of the most specific layer prefix matching `module` (e.g. model.config vs model)."""
    rel = module.removeprefix("mistralpy.")
    best, best_len = None, -1
    for i, prefixes in enumerate(layers):
        for p in prefixes:
            if (rel == p or rel.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    return best


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
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
            # `from mistralpy import model` names a submodule, not an attribute.
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names if base == "mistralpy"]
    return [(line, name) for line, name in found if name.startswith("mistralpy.")]


def upward_edges() -> list[str]:
    layers = layer_order()
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module == "mistralpy":
            continue  # the top-level lazy re-exports sit above every layer
        own = layer_of(module, layers)
        assert own is not None, f"{module} belongs to no layer in ARCHITECTURE.md"
        for line, target in imports_of(path, module):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > own:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {target}")
    return bad


def test_layer_order_is_parsed():
    layers = layer_order()
    flat = [p for layer in layers for p in layer]
    assert flat.index("params") < flat.index("kernels") < flat.index("server")


def test_no_upward_imports():
    bad = upward_edges()
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_detects_an_upward_edge(tmp_path):
    layers = layer_order()
    assert layer_of("mistralpy.server.app", layers) > layer_of("mistralpy.kernels.sampling", layers)
    assert layer_of("mistralpy.model.config", layers) < layer_of("mistralpy.kernels", layers)
