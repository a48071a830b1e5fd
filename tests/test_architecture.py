"""No module imports upward: every import in the package (lazy ones inside functions included) goes to the same or a
lower layer of the table in docs/ARCHITECTURE.md, and every module has a row."""

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "starling_jax"


def layer_table() -> list[tuple[str, list[str]]]:
    """[(layer name, [module patterns])] from the import table, top layer first."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split("## Modules and the direction of imports", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[0] in ("layer", "") or set(cells[0]) <= {"-"}:
            continue
        rows.append((cells[0], re.findall(r"`([^`]+)`", cells[1])))
    return rows


def layer_of(rel: str, table) -> int:
    """Rank of module file `rel` (relative to starling_jax/): 0 = the bottom row. An exact path beats a folder/*."""
    n = len(table)
    exact = [n - 1 - i for i, (_, pats) in enumerate(table) if rel in pats]
    if exact:
        return exact[0]
    wild = [n - 1 - i for i, (_, pats) in enumerate(table) for p in pats if "*" in p and fnmatch.fnmatch(rel, p)]
    if not wild:
        raise KeyError(rel)
    return wild[0]


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported_modules(path: Path, name: str, modules: dict) -> set[str]:
    """Project modules an import in `path` runs: the named module, its parent packages' __init__, and for
    `from pkg import sub` the submodule `sub`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith("starling_jax"):
                continue
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                if ".".join(parts[:i]) in modules:
                    found.add(".".join(parts[:i]))
    found.discard(name)
    return found


def test_every_module_has_a_row_and_no_import_points_up():
    table = layer_table()
    assert [t for t, _ in table][-1] == "foundation" and len(table) >= 6, table
    modules = module_files()
    rel = {m: str(p.relative_to(PACKAGE)) for m, p in modules.items()}
    missing = [r for r in rel.values() if _safe_layer(r, table) is None]
    assert not missing, f"modules without a row in docs/ARCHITECTURE.md: {missing}"
    upward = []
    for name, path in sorted(modules.items()):
        mine = layer_of(rel[name], table)
        for other in sorted(imported_modules(path, name, modules)):
            theirs = layer_of(rel[other], table)
            if theirs > mine:
                upward.append(f"{rel[name]} ({table[len(table) - 1 - mine][0]}) imports {rel[other]} "
                              f"({table[len(table) - 1 - theirs][0]})")
    assert not upward, "imports pointing up the table:\n" + "\n".join(upward)


def _safe_layer(rel, table):
    try:
        return layer_of(rel, table)
    except KeyError:
        return None


def test_the_check_catches_an_upward_import(tmp_path):
    table = [("top", ["cli.py"]), ("bottom", ["models/*"])]
    assert layer_of("cli.py", table) == 1 and layer_of("models/transformer.py", table) == 0
    with pytest.raises(KeyError):
        layer_of("plan.py", table)
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from starling_jax.train import loop\n")
    modules = {"starling_jax.train": tmp_path / "t" / "__init__.py", "starling_jax.train.loop": tmp_path / "l.py"}
    assert imported_modules(f, "starling_jax.models.m", modules) == {"starling_jax.train", "starling_jax.train.loop"}
