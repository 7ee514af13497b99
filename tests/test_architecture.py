"""The package's shape: rooms named for the layers, imports that run one way (a layer imports
only the layers below it), no import cycle, and modules small enough to read in one sitting."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "paged_jax"
# Bottom to top; "" is the shared vocabulary at the top level of the package. The package's
# __init__ (its public names) and cli.py (the console script) stand above everything.
LAYERS = {"": 0, "model": 1, "kv": 1, "core": 2, "worker": 3, "spec_decode": 4, "engine": 5, "server": 6}
APEX = {"paged_jax", "paged_jax.cli"}
MAX_LINES = 450
MAX_TOP_LEVEL_MODULES = 10


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """module -> the paged_jax modules it imports (type-checking imports included)."""
    known = {module_name(p) for p in PACKAGE.rglob("*.py")}
    graph = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("paged_jax"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    graph[module_name(path)].add(full if full in known else node.module)
            elif isinstance(node, ast.Import):
                graph[module_name(path)].update(a.name for a in node.names if a.name.startswith("paged_jax"))
    return graph


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def test_each_layer_imports_only_the_layers_below_it():
    upward = [(m, d) for m, deps in imports().items() if m not in APEX for d in deps
              if d != "paged_jax" and (LAYERS[layer(d)] > LAYERS[layer(m)]
                                       or (LAYERS[layer(d)] == LAYERS[layer(m)] and layer(d) != layer(m)))]
    assert upward == []


def test_there_is_no_import_cycle():
    graph = imports()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1 and dep != "paged_jax":
                return path + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[module] = 2
        return None

    cycles = [c for m in sorted(graph) if m not in state and (c := visit(m, [m]))]
    assert cycles == []


def test_modules_are_small_and_the_top_level_is_the_shared_vocabulary():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(LAYERS) - {""}


def protocol_members(protocol: type) -> set[str]:
    annotated = set(getattr(protocol, "__annotations__", {}))
    methods = {name for name, value in vars(protocol).items()
               if (callable(value) or isinstance(value, property)) and not name.startswith("_")}
    return annotated | methods


def test_each_implementer_has_every_member_of_its_protocol():
    """Protocols are checked structurally by nobody at run time: this is the check. Attributes
    are looked up on an instance (they are set in __init__), methods on the class."""
    from experiments.simulator import simulated_engine
    from paged_jax.engine.client import EngineClient
    from paged_jax.engine.data_parallel import DataParallelEngine
    from paged_jax.engine.multihost import Leader
    from paged_jax.kv import BlockManager, ReservingBlockManager
    from paged_jax.kv.interface import KVCacheManager
    from paged_jax.spec_decode.draft_model import DraftModelProposer
    from paged_jax.spec_decode.ngram import NgramProposer
    from paged_jax.spec_decode.proposer import Proposer
    from paged_jax.worker.cost_model import CostModelExecutor
    from paged_jax.worker.executor import Executor
    from paged_jax.worker.model_runner import ModelRunner

    engine = simulated_engine("paged-jax")
    leader = Leader(engine)
    instances = {
        EngineClient: [engine, leader],
        KVCacheManager: [BlockManager(16, 4, 4), ReservingBlockManager(16, 4, "max", 64)],
        Executor: [engine.executor],
    }
    classes = {EngineClient: [DataParallelEngine], Executor: [ModelRunner, CostModelExecutor],
               Proposer: [NgramProposer, DraftModelProposer]}
    missing = {(p.__name__, type(x).__name__, m) for p, xs in instances.items() for x in xs
               for m in protocol_members(p) if not hasattr(x, m)}
    methods = {m for p in classes for m in protocol_members(p) if callable(getattr(p, m, None))}
    missing |= {(p.__name__, c.__name__, m) for p, cs in classes.items() for c in cs
                for m in protocol_members(p) & methods if not callable(getattr(c, m, None))}
    leader.close()
    assert missing == set()


def test_the_engine_arguments_name_every_memory_manager_the_kv_layer_makes():
    from paged_jax.engine_args import MEMORY_MANAGERS
    from paged_jax.kv.reservation import POLICIES

    assert set(MEMORY_MANAGERS) == {"paged"} | {f"orca-{policy}" for policy in POLICIES}
