"""The folders are the layers: every import in the package (lazy ones inside functions included) goes to the same or a
lower layer of the table in docs/ARCHITECTURE.md, every module lies in a folder (or is a file) that has a row, and an
import inside a function is allowed only where the list of lazy imports there names it with its reason."""

import ast
import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "starling_jax"
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def _section(title: str) -> str:
    return DOC.read_text().split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _rows(text: str) -> list[list[str]]:
    """The cells of every row of the first markdown table in `text` (header and rule skipped)."""
    rows = []
    for line in text.split("\n\n|", 1)[-1].splitlines() if "\n\n|" in text else text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if set(cells[0]) <= {"-"} or cells[0] in ("layer", "module"):
            continue
        rows.append(cells)
    return rows


def layer_table() -> list[tuple[str, list[str]]]:
    """[(layer name, [folders 'x/' and top-level files 'y.py'])] from the import table, top layer first."""
    section = _section("Folders and the direction of imports").split("\nImports inside functions", 1)[0]
    return [(cells[0], re.findall(r"`([^`]+)`", cells[1])) for cells in _rows(section) if len(cells) >= 2]


def lazy_table() -> list[tuple[str, list[str], str]]:
    """[(module file, [imported module patterns], reason)] from the list of allowed imports inside functions."""
    section = _section("Folders and the direction of imports").split("\nImports inside functions", 1)[1]
    out = []
    for cells in _rows(section):
        (module,) = re.findall(r"`([^`]+)`", cells[0])
        out.append((module, re.findall(r"`([^`]+)`", cells[1]), cells[2]))
    return out


def layer_of(rel: str, table) -> int:
    """Rank of module file `rel` (relative to starling_jax/): 0 = the bottom row. A file lies in the layer of its
    top-level folder; a top-level file needs a row of its own."""
    n = len(table)
    top = rel.split("/", 1)[0] + "/" if "/" in rel else rel
    found = [n - 1 - i for i, (_, entries) in enumerate(table) if top in entries]
    if not found:
        raise KeyError(rel)
    return found[0]


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


def imports_of(path: Path, name: str, modules: dict) -> dict[str, bool]:
    """Project modules an import in `path` runs -> whether an import of it sits inside a function: the named module,
    its parent packages' __init__, and for `from pkg import sub` the submodule `sub`."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    found: dict[str, bool] = {}
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
                m = ".".join(parts[:i])
                if m in modules and m != name:
                    found[m] = found.get(m, False) or id(node) in inner
    return found


def imported_modules(path: Path, name: str, modules: dict) -> set[str]:
    return set(imports_of(path, name, modules))


def _rel(modules: dict) -> dict[str, str]:
    return {m: str(p.relative_to(PACKAGE)) for m, p in modules.items()}


def test_every_folder_has_a_row_and_no_import_points_up():
    table = layer_table()
    assert [t for t, _ in table][-1] == "foundation" and len(table) >= 6, table
    for layer, entries in table[:-3]:  # only the bottom rows (config types, pure math, foundation) hold files
        assert all(e.endswith("/") for e in entries), f"layer {layer!r}: name folders, not files: {entries}"
    modules = module_files()
    rel = _rel(modules)
    missing = [r for r in rel.values() if _safe_layer(r, table) is None]
    assert not missing, f"modules outside every folder of docs/ARCHITECTURE.md's table: {missing}"
    upward = []
    for name, path in sorted(modules.items()):
        mine = layer_of(rel[name], table)
        for other in sorted(imported_modules(path, name, modules)):
            theirs = layer_of(rel[other], table)
            if theirs > mine:
                upward.append(f"{rel[name]} ({table[len(table) - 1 - mine][0]}) imports {rel[other]} "
                              f"({table[len(table) - 1 - theirs][0]})")
    assert not upward, "imports pointing up the table:\n" + "\n".join(upward)


def lazy_violations(files: dict, rel: dict, modules: dict, allowed) -> tuple[list[str], set[int]]:
    """(imports inside functions that no row of `allowed` names, the rows used)."""
    unlisted, used = [], set()
    for name, path in sorted(files.items()):
        for other, lazy in sorted(imports_of(path, name, modules).items()):
            if not lazy or other == "starling_jax":  # the root package is loaded before any of its modules
                continue
            hit = [i for i, (m, pats, _) in enumerate(allowed)
                   if m == rel[name] and any(fnmatch.fnmatch(rel[other], p) for p in pats)]
            used.update(hit)
            if not hit:
                unlisted.append(f"{rel[name]} imports {rel[other]} inside a function")
    return unlisted, used


def test_imports_inside_functions_are_listed_with_a_reason():
    allowed = lazy_table()
    assert allowed and all(len(reason) > 20 for _, _, reason in allowed)
    modules = module_files()
    unlisted, used = lazy_violations(modules, _rel(modules), modules, allowed)
    assert not unlisted, ("imports inside functions that docs/ARCHITECTURE.md does not list (import at the top, or "
                          "list it with its reason):\n" + "\n".join(unlisted))
    stale = [allowed[i][0] for i in range(len(allowed)) if i not in used]
    assert not stale, f"listed lazy imports that no longer exist: {stale}"


def _safe_layer(rel, table):
    try:
        return layer_of(rel, table)
    except KeyError:
        return None


def test_the_check_catches_an_upward_import(tmp_path):
    table = [("top", ["commands/"]), ("bottom", ["models/", "errors.py"])]
    assert layer_of("commands/cli.py", table) == 1 and layer_of("models/transformer.py", table) == 0
    assert layer_of("commands/eval/cli.py", table) == 1 and layer_of("errors.py", table) == 0
    with pytest.raises(KeyError):
        layer_of("plan.py", table)
    f = tmp_path / "m.py"
    f.write_text("import starling_jax.models\ndef f():\n    from starling_jax.stages import loop\n")
    modules = {"starling_jax.stages": tmp_path / "t" / "__init__.py", "starling_jax.stages.loop": tmp_path / "l.py",
               "starling_jax.models": tmp_path / "n" / "__init__.py"}
    assert imports_of(f, "starling_jax.io.m", modules) == {"starling_jax.stages": True,
                                                           "starling_jax.stages.loop": True,
                                                           "starling_jax.models": False}
    allowed = [("io/m.py", ["stages/*"], "a reason")]
    rel = {"starling_jax.io.m": "io/m.py", "starling_jax.stages": "stages/__init__.py",
           "starling_jax.stages.loop": "stages/loop.py", "starling_jax.models": "models/__init__.py"}
    assert lazy_violations({"starling_jax.io.m": f}, rel, modules, allowed) == ([], {0})
    assert lazy_violations({"starling_jax.io.m": f}, rel, modules, [])[0] == [
        "io/m.py imports stages/__init__.py inside a function", "io/m.py imports stages/loop.py inside a function"]


LONG_FILE = 400  # "no file over ~400 lines without a reason written at its top"


def test_every_long_module_says_at_its_top_why_it_is_long():
    """A module over ~400 lines states, in its docstring, why it is long (and where it would be cut): one sentence a
    newcomer reads before the code, as models/transformer.py does."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        if text.count("\n") > LONG_FILE and "Why this file is long" not in (ast.get_docstring(ast.parse(text)) or ""):
            unexplained.append(f"{path.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    assert not unexplained, "long modules without a reason at their top: " + ", ".join(unexplained)


def test_the_math_layer_knows_no_algorithm_names():
    """objectives/ and models/ take behaviour as arguments (a baseline, a KL estimator, its placement): no string in
    their code (docstrings aside) is the name of a registered algorithm."""
    from starling_jax.algorithms import registry

    names = set(registry.names())
    for folder in ("objectives", "models"):
        for path in sorted((PACKAGE / folder).glob("*.py")):
            tree = ast.parse(path.read_text())
            docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                          if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                          and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
            found = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                     and id(n) not in docstrings and n.value in names}
            assert not found, f"{path.relative_to(ROOT)} names algorithm(s) {sorted(found)}"
