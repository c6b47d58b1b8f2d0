"""The package import graph follows ../shared/DESIGN.md ("Who may import whom").

Every module under ``lightning_interp/`` is parsed with :mod:`ast` (nothing is imported), and
each import of the library is classified as *top-level* (run when the module is imported) or
*deferred* (inside a function, or under ``if TYPE_CHECKING:``). Edges are between packages:
the first level under ``lightning_interp`` (``dictionaries``, ``zoo``, ``cli``, ``_io``...),
``""`` for the package's own ``__init__.py``. Imports by string (``importlib``) are not seen.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

import lightning_interp

ROOT = Path(lightning_interp.__file__).parent

#: Neutral modules: anything may import them; they import only each other and ``errors``.
NEUTRAL = {"_io", "_dtypes", "_validation", "_weights", "_commands", "errors"}
NEUTRAL_IMPORTS = {
    "errors": set(),
    "_io": {"errors"},
    "_validation": {"errors"},
    "_dtypes": {"errors", "_validation"},
    "_weights": {"errors", "_io", "_dtypes"},
    "_commands": {"errors"},
}

#: DESIGN.md's table: what each package may import at module level (besides neutral modules),
#: with three amendments the code showed to be right (each marked; README "Layout" says so).
ALLOWED = {
    # Amended: the CLI installs callbacks (LogProgress) by default. Nothing imports the CLI,
    # so it may import anything; DESIGN's list was an example, not a limit.
    "cli": {"modules", "features", "circuits", "zoo", "callbacks"},
    # Amended: modules/clt_module.py trains the cross-layer transcoder of circuits/.
    "modules": {"dictionaries", "concepts", "metrics", "data", "circuits"},
    # Amended: the feature tools read a dictionary from any source (a folder, the Hub, a
    # catalogue id) through the zoo's one loader, as the CLI's other commands do.
    "features": {"dictionaries", "backbones", "data", "metrics", "zoo"},
    "circuits": {"dictionaries", "backbones", "data", "metrics"},
    # Auto-interpretation reads feature stores, loads its LM and sentence encoder through the
    # backbones' offline loader, and reuses the metrics' rank AUROC.
    "autointerp": {"features", "backbones", "metrics"},
    # The evaluation suite reuses the metrics (FVU, L0, CE/KL by splicing), reads text and
    # backbones as training does, loads any dictionary source through the zoo and takes
    # backbone/site/text from provenance as `features` does (features.commands.resolve);
    # its autointerp eval runs the explain pipeline (autointerp) on a feature store.
    "evals": {"metrics", "backbones", "data", "features", "zoo", "autointerp"},
    # Amended: zoo/formats/clt_layouts.py reads other libraries' CLT folders into circuits/.
    "zoo": {"dictionaries", "concepts", "circuits"},
    # Amended: callbacks are the plug-in twin of modules/ and reuse its training core
    # (DictionaryLearner, the non-finite guards) rather than copy it; a plug-in also loads
    # dictionaries from the zoo (SpliceDictionary("org/repo")). modules/ never imports
    # callbacks/, so no circle.
    # Amended: FeatureDashboard ends a fit with the feature tools' store and dashboard.
    "callbacks": {"dictionaries", "metrics", "backbones", "data", "modules", "zoo", "features"},
    "data": {"backbones"},
    # Leaves, usable without Lightning or the Hub.
    "dictionaries": set(),
    # Amended: the SAE-named concept bottleneck (Discover-then-Name) holds a dictionary.
    "concepts": {"dictionaries"},
    # Amended: downstream metrics (CE loss recovered) must run the frozen backbone with a
    # dictionary spliced in; every other metric is a leaf.
    "metrics": {"backbones"},
    "backbones": set(),
    # The package facade: ``from lightning_interp import Dictionary, create_dictionary``.
    "": {"dictionaries"},
}

#: What may be imported only inside a function (never at import time).
DEFERRED_ONLY = {
    # DESIGN: a dictionary's push_to_hub / from_pretrained reaches the zoo lazily.
    "dictionaries": {"zoo"},
    # Concept heads mix in save/load/push as dictionaries do (DESIGN: ModelHubMixin style).
    "concepts": {"zoo"},
    # ``lightning_interp.load_dictionary`` resolves on first use, so importing any
    # subpackage (which runs the facade) loads neither the zoo nor concept heads.
    "": {"zoo"},
    # ``lightning-interp --version`` reads ``lightning_interp.__version__``.
    "cli": {""},
}


def _package(module: str) -> str:
    """``lightning_interp.zoo.formats.native`` -> ``"zoo"``; the facade -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_name(path: Path) -> str:
    parts = ("lightning_interp", *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The library modules an import statement names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against this module's package
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        anchor = anchor[: len(anchor) - node.level + 1]
        base = ".".join([*anchor, base] if base else anchor)
    if base != "lightning_interp":
        return [base]
    # ``from lightning_interp import x``: a submodule if one is named x, else the facade.
    names = [alias.name for alias in node.names]
    return [
        f"lightning_interp.{name}"
        if (ROOT / name).is_dir() or (ROOT / f"{name}.py").is_file()
        else "lightning_interp"
        for name in names
    ]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, str]]:
    """``(target module, "top" | "deferred")`` for every library import in ``path``."""
    module = _module_name(path)
    is_package = path.name == "__init__.py"
    found: list[tuple[str, str]] = []

    def visit(node: ast.AST, kind: str) -> None:
        for child in ast.iter_child_nodes(node):
            child_kind = kind
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                child_kind = "deferred"
            elif isinstance(child, ast.If) and _is_type_checking(child):
                child_kind = "deferred"
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in _targets(child, module, is_package):
                    if target == "lightning_interp" or target.startswith("lightning_interp."):
                        found.append((target, child_kind))
            visit(child, child_kind)

    visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), "top")
    return found


def _graph() -> dict[tuple[str, str, str], set[str]]:
    """``(source package, target package, kind)`` -> the module-level edges behind it."""
    edges: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        for target, kind in _imports(path):
            source, dest = _package(module), _package(target)
            if source != dest:
                edges[source, dest, kind].add(f"{module} -> {target}")
    return dict(edges)


GRAPH = _graph()


def _cycle(edges: set[tuple[str, str]]) -> list[str] | None:
    """One circle in the directed graph ``edges`` (as a path of nodes), or ``None``."""
    successors: dict[str, set[str]] = defaultdict(set)
    for source, dest in edges:
        successors[source].add(dest)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(successors[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(successors):
        if start not in state and (found := walk(start, [start])):
            return found
    return None


def _describe(keys) -> str:
    return "\n".join(f"{key}: {sorted(GRAPH[key])}" for key in sorted(keys))


def test_the_parser_sees_the_known_edges():
    # Guards the test itself: a parser that found nothing would pass every rule below.
    assert ("zoo", "dictionaries", "top") in GRAPH
    assert ("dictionaries", "zoo", "deferred") in GRAPH
    assert ("", "zoo", "deferred") in GRAPH  # the facade's lazy load_dictionary
    assert len(GRAPH) > 20


def test_the_table_itself_has_no_circle():
    table = {(s, d) for s, targets in ALLOWED.items() for d in targets}
    assert _cycle(table) is None


def test_every_edge_is_allowed_by_design():
    bad = set()
    for source, dest, kind in GRAPH:
        if dest in NEUTRAL:
            continue
        if source in NEUTRAL:
            continue  # test_neutral_modules_import_nothing_of_ours
        allowed = ALLOWED.get(source, set())
        if kind == "deferred":
            allowed = allowed | DEFERRED_ONLY.get(source, set())
        if dest not in allowed:
            bad.add((source, dest, kind))
    assert not bad, "imports DESIGN.md does not allow:\n" + _describe(bad)


def test_neutral_modules_import_nothing_of_ours():
    bad = {
        (source, dest, kind)
        for source, dest, kind in GRAPH
        if source in NEUTRAL and dest not in NEUTRAL_IMPORTS[source]
    }
    assert not bad, _describe(bad)


def test_no_import_circle_between_packages():
    # Deferred imports DESIGN allows (push_to_hub reaching the zoo) run after every module
    # is loaded, so they close no circle at import time; every other edge counts.
    edges = {
        (source, dest)
        for source, dest, kind in GRAPH
        if not (kind == "deferred" and dest in DEFERRED_ONLY.get(source, set()))
    }
    assert _cycle(edges) is None, f"import circle: {' -> '.join(_cycle(edges))}"


def test_nothing_imports_the_cli():
    bad = {key for key in GRAPH if key[1] == "cli"}
    assert not bad, _describe(bad)


@pytest.mark.parametrize(
    ("package", "absent"),
    [
        ("dictionaries", {"zoo", "concepts", "modules", "data", "backbones", "metrics"}),
        ("concepts", {"zoo", "modules", "data", "backbones", "metrics"}),
    ],
)
def test_a_leaf_imports_alone(package, absent):
    # The real interpreter, not the parse: what ``import lightning_interp.<leaf>`` loads.
    code = (
        f"import sys, lightning_interp.{package}; "
        "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('lightning_interp.')}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = set(ast.literal_eval(result.stdout.strip()))
    assert package in loaded and not loaded & absent, loaded
