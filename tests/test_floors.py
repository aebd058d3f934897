"""The package's floors (``DESIGN.md``), enforced from the imports themselves.

Every module of ``agrivlm/`` and ``app/`` is parsed (no import runs): each ``import``/``from … import`` of an
agrivlm module, at module level, inside a function or under ``TYPE_CHECKING``, must go to the importer's own
floor or one below; ``train`` and ``infer`` are siblings that never import each other; no module imports a
private name of another package; no two modules import each other, however indirectly; and no function is longer
than 60 lines. The floors are read from ``DESIGN.md``'s table, so the page and the rule cannot drift apart.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: The checkpoint shipped inside the package carries its own remote-code file (``trust_remote_code``); it is
#: data that imports the model from outside, not a floor of the package.
NOT_CODE = ("default_model", "sample_data")
SIBLINGS = {"train", "infer"}


def floors() -> dict[str, int]:
    """``{package or top-level module: floor}`` from ``DESIGN.md``'s floor table (lines ``N  name, name …``)."""
    text = (ROOT / "DESIGN.md").read_text()
    block = text.split("<!-- floors -->")[1]
    out: dict[str, int] = {}
    for line in block.splitlines():
        m = re.match(r"^(\d)\s+(.+?)(?:\s{2,}.*)?$", line.strip())
        if m:
            for name in re.split(r"[,\s]+", m.group(2).strip()):
                out[name] = int(m.group(1))
    return out


def modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of the package and of ``app/``."""
    out: dict[str, Path] = {}
    for path in sorted((ROOT / "agrivlm").rglob("*.py")) + sorted((ROOT / "app").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] == "agrivlm" and len(parts) > 1 and parts[1] in NOT_CODE:
            continue
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(name: str, path: Path) -> list[tuple[str, int, list[str]]]:
    """``(imported agrivlm module, line, names)`` for every import in a module, lazy ones included."""
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == "agrivlm":
                found.append((target, node.lineno, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, []) for a in node.names if a.name.split(".")[0] == "agrivlm"]
    return found


def unit(module: str) -> str:
    """The floor unit of a module: ``agrivlm.geo.stack`` → ``geo``, ``agrivlm`` → ``agrivlm``, ``app.x`` → ``app``."""
    parts = module.split(".")
    if parts[0] == "app":
        return "app"
    return parts[1] if len(parts) > 1 else "agrivlm"


def test_design_lists_every_package_and_module():
    placed = floors()
    units = {unit(m) for m in modules()}
    assert units - placed.keys() == set(), "add these to DESIGN.md's floor table"
    assert placed.keys() - units == set(), "DESIGN.md names packages that do not exist"


def test_imports_only_look_down():
    placed = floors()
    wrong = []
    for name, path in modules().items():
        here = unit(name)
        for target, line, _ in imports(name, path):
            there = unit(target)
            if there == here:
                continue
            if placed[there] > placed[here] or (here in SIBLINGS and there in SIBLINGS):
                wrong.append(f"{path.relative_to(ROOT)}:{line}: {here} (floor {placed[here]}) imports {target} "
                             f"(floor {placed[there]})")
    assert wrong == []


def test_no_private_names_across_packages():
    mods = modules()
    wrong = [f"{path.relative_to(ROOT)}:{line}: {target}.{n}"
             for name, path in mods.items() for target, line, names in imports(name, path)
             if unit(target) != unit(name) for n in names if n.startswith("_") and not n.endswith("__")]
    assert wrong == []


def test_no_import_cycles():
    mods = modules()

    def resolve(target: str, names: list[str]) -> set[str]:
        # ``from agrivlm.geo import stack`` imports the module agrivlm.geo.stack; else the longest module prefix
        out = {f"{target}.{n}" for n in names if f"{target}.{n}" in mods}
        parts = target.split(".")
        while parts and ".".join(parts) not in mods:
            parts.pop()
        return out | ({".".join(parts)} if parts else set())

    graph = {name: {t for target, _, names in imports(name, path) for t in resolve(target, names)} - {name}
             for name, path in mods.items()}
    # a package's __init__ importing its own modules is the usual re-export, not a cycle
    edges = {a: {b for b in bs if not (b.startswith(a + ".") and mods[a].name == "__init__.py")}
             for a, bs in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert cycles == []


@pytest.mark.parametrize("source", [
    "from agrivlm.model.processing import AgriVLMProcessor\n",  # pipeline (3) importing the model (4)
    "def f():\n    from agrivlm.train.trainer import run_stage\n",  # a lazy import counts too
])
def test_an_upward_import_is_caught(tmp_path, source):
    """The rule is not vacuous: the same check on a pipeline module that imports upward finds it."""
    path = tmp_path / "bad.py"
    path.write_text(source)
    placed = floors()
    found = [t for t, _, _ in imports("agrivlm.pipeline.bad", path) if placed[unit(t)] > placed["pipeline"]]
    assert len(found) == 1


#: The longest a function of ``agrivlm/`` and ``app/`` may be, ``def`` line to last line, docstring included.
MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {lines} lines")
    assert long == []


def test_every_reader_of_chips_starts_from_one_chip_grid():
    """Ingest, the explorer, the recipes, a checkpoint's inputs and the quickstart default to the same chips."""
    import inspect

    from agrivlm.explore.settings import ExploreSettings
    from agrivlm.geo.grid import CHIP_SIZE, CHIP_STRIDE
    from agrivlm.geo.ingest import ingest
    from agrivlm.pipeline.inputs import ChipRule, InputConfig
    from agrivlm.quickstart.run import CHIP
    from agrivlm.recipes.config import RecipeConfig

    assert inspect.signature(ingest).parameters["chip_size"].default == CHIP_SIZE
    assert ExploreSettings.__dataclass_fields__["chip_size"].default == CHIP_SIZE
    assert RecipeConfig.model_fields["chips"].annotation is ChipRule  # the recipes cut chips by the contract's rule
    assert (ChipRule().size, ChipRule().stride) == (CHIP_SIZE, CHIP_STRIDE)
    assert (InputConfig().chip_size, InputConfig().stride) == (CHIP_SIZE, CHIP_STRIDE)
    assert CHIP == CHIP_SIZE
    assert (InputConfig().frames.max_frames, InputConfig().min_frames) == (ChipRule().max_frames,
                                                                           ChipRule().min_frames)


def test_the_shipped_checkpoint_saves_one_chip_input_contract():
    """The processor's saved chip settings and the checkpoint's ``agrivlm_inputs.yaml`` say the same frames and
    bands (training writes both from one :class:`~agrivlm.pipeline.inputs.InputConfig`)."""
    import json

    from agrivlm.default_checkpoint import DEFAULT_MODEL_DIR
    from agrivlm.pipeline.inputs import load_input_config

    inputs, found = load_input_config(DEFAULT_MODEL_DIR)
    assert found
    chip = json.loads((DEFAULT_MODEL_DIR / "processor_config.json").read_text())["chip_config"]
    assert chip["sampling"] == inputs.frames.model_dump(mode="json")
    bands = inputs.bands.model_dump(mode="json")
    assert {k: chip["bands"][k] for k in ("preset", "composite", "low", "high")} == {
        k: bands[k] for k in ("preset", "composite", "low", "high")}
    assert list(chip["bands"]["percentiles"]) == list(bands["percentiles"])
