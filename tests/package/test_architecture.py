"""The package's shape: no import cycles, no private names borrowed across modules, and the
wings that promise to run without MindSpore (weights/, retrieval/) really do."""
import ast
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "vehiclenet"


def _modules() -> Dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> List[Tuple[str, str, int]]:
    """(imported module, imported name or "", line) for every import of a vehiclenet module,
    at the top of the file or inside a function alike."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target not in modules:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub, "", node.lineno) if sub in modules else (target, alias.name, node.lineno))
    return found


def _graph() -> Dict[str, Set[str]]:
    """Module -> modules it imports. An import of an enclosing package (``from .. import
    __version__``) is left out: a package is initialised before any module inside it, and the
    root's own imports are lazy attributes, so such an edge never runs a half-imported module."""
    modules = _modules()
    graph: Dict[str, Set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _, _ in _imports(name, path, modules):
            if target != name and not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert len(graph) > 40 and "vehiclenet.retrieval.index" in graph  # the walk saw the package
    assert _cycles(graph) == []


def test_a_planted_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_imports_a_private_name_of_another():
    """``from .x import _name`` across modules, or a ``_module`` from outside its own package."""
    modules = _modules()
    borrowed = []
    for name, path in modules.items():
        for target, imported, line in _imports(name, path, modules):
            package, _, leaf = target.rpartition(".")
            outsider = _is_private(leaf) and not (name == package or name.startswith(package + "."))
            if target != name and (_is_private(imported) or outsider):
                borrowed.append(f"{path.relative_to(PACKAGE.parent)}:{line} {target} {imported}")
    assert borrowed == []


@pytest.mark.parametrize("wing", ["weights", "retrieval"])
def test_a_wing_that_needs_no_network_imports_no_mindspore(wing):
    names = sorted(n for n in _modules() if n == f"vehiclenet.{wing}" or n.startswith(f"vehiclenet.{wing}."))
    assert len(names) >= 4
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mindspore'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_import_vehiclenet_loads_neither_mindspore_nor_numpy():
    code = "import sys, vehiclenet; print(sorted({m.split('.')[0] for m in sys.modules} & {'mindspore', 'numpy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("old, names", [
    ("features", ["embed", "extract_features", "list_images", "load_features", "save_features", "nearest",
                  "FeatureResult"]),
    ("evaluation", ["evaluate", "evaluate_features", "cosine_distance", "read_veri", "load_features_npz",
                    "FeatureSet"]),
    ("index", ["GalleryIndex", "build_index"]),
    ("finetune", ["finetune", "scan_training_data", "build_train_step", "CheckpointSaver"]),
])
def test_the_modules_of_before_the_regrouping_still_give_their_names_with_a_warning(old, names):
    import importlib

    sys.modules.pop(f"vehiclenet.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(f"vehiclenet.{old}")
    assert any(issubclass(w.category, DeprecationWarning) and f"vehiclenet.{old}" in str(w.message) for w in caught)
    assert [n for n in names if not hasattr(module, n)] == []


def test_kernel_entry_points_are_named_from_one_table():
    from vehiclenet.model import kernel_abi as abi

    assert abi.conv("bf16", "S1Relu") == "VnConvBf16S1Relu" and abi.backbone("fp32", 1) == "VnBackboneL1"
    assert abi.train_conv("BackwardWeights", "bf16", 2) == "VnConvBackwardWeightsBf16S2"
    assert len(set(abi.SYMBOLS)) == len(abi.SYMBOLS)
    with pytest.raises(ValueError, match="VnConvBf16S3Relu is not an entry point"):
        abi.conv("bf16", "S3Relu")
