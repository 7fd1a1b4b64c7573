"""DVC re-runs exactly what changed: every stage's ``deps`` cover the code the stage runs.

For each stage of dvc.yaml (``matrix`` stages expanded: pretrain@simclr, ...), the command's
``python -m lowlabel.stages.X`` module and, transitively, every lowlabel module it imports are
found statically (an AST walk: module-level and function-level imports, ``from lowlabel.x
import y`` where y is a submodule, relative imports, and the ``__init__`` of every package on
the way, which Python runs too). Each of those files must be covered by one of the stage's
deps: the file itself or a folder holding it. A missing one means an edit to it would not
re-run the stage. The reverse (a dep the stage never imports) only costs needless re-runs: it is
reported as a warning, not a failure, except that pretraining must not depend on
semi-supervised code at all.
"""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path, PurePosixPath

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
STAGE_CMD = re.compile(r"\bpython -m (lowlabel(?:\.\w+)+)")
# Semi-supervised code by name: the methods, their registry, the training loop, the stage.
SEMISUP_NAME = re.compile(r"(?:^|\.)(?:semisup\w*|fixmatch|uda|freematch)(?:\.|$)")


# --------------------------------------------------------------------------- import closure


def module_file(name: str, src: Path = SRC) -> Path | None:
    base = src.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(tree: ast.AST):
    """ast.walk, leaving out ``if TYPE_CHECKING:`` bodies (never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _type_checking_only(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def direct_imports(name: str, src: Path = SRC) -> set[str]:
    """The lowlabel modules ``name`` imports anywhere in its body (existing files only)."""
    path = module_file(name, src)
    assert path is not None, name
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # y may be a submodule
    return {m for m in found if m.split(".")[0] == "lowlabel" and module_file(m, src)}


def import_closure(entry: str, src: Path = SRC) -> set[str]:
    """``entry`` and every lowlabel module importing it runs, parent packages included."""
    seen: set[str] = set()
    todo = [entry]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name not in seen and module_file(name, src):
                seen.add(name)
                todo.extend(direct_imports(name, src))
    return seen


def closure_files(entry: str) -> set[str]:
    return {module_file(m).relative_to(REPO).as_posix() for m in import_closure(entry)}


# --------------------------------------------------------------------------- dvc.yaml


def _lookup(expr: str, context: dict):
    node = context
    for key in expr.split("."):
        node = node[key]
    return node


def _resolve(value, context: dict):
    """DVC's ``${a.b}`` interpolation, enough for dvc.yaml's own uses."""
    if isinstance(value, str):
        whole = re.fullmatch(r"\$\{\s*([\w.]+)\s*\}", value)
        if whole:
            return _lookup(whole[1], context)
        return re.sub(r"\$\{\s*([\w.]+)\s*\}", lambda m: str(_lookup(m[1], context)), value)
    if isinstance(value, list):
        return [_resolve(v, context) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, context) for k, v in value.items()}
    return value


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages by their DVC names, ``matrix``/``foreach`` expanded (params.yaml values)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out: dict[str, dict] = {}
    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "matrix" in stage:
            body = {k: v for k, v in stage.items() if k != "matrix"}
            axes = {axis: _resolve(values, params) for axis, values in stage["matrix"].items()}
            assert len(axes) == 1, f"{name}: one matrix axis expected"
            (axis, values), = axes.items()
            for value in values:
                out[f"{name}@{value}"] = _resolve(body, {**params, "item": {axis: value}})
        elif "foreach" in stage:
            items = _resolve(stage["foreach"], params)
            for key in items if isinstance(items, list) else items.keys():
                item = key if isinstance(items, list) else items[key]
                out[f"{name}@{key}"] = _resolve(stage["do"], {**params, "item": item, "key": key})
        else:
            out[name] = stage
    return out


def stage_module(stage: dict) -> str:
    cmd = " ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"]
    match = STAGE_CMD.search(cmd)
    assert match, f"cmd {cmd!r} runs no `python -m lowlabel...` module"
    return match[1]


def dep_paths(stage: dict) -> list[str]:
    return [str(PurePosixPath(d if isinstance(d, str) else next(iter(d)))) for d in stage.get("deps", [])]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == dep or path.startswith(dep.rstrip("/") + "/") for dep in deps)


STAGES = dvc_stages()


# --------------------------------------------------------------------------- tests


def test_every_stage_runs_a_lowlabel_module():
    assert {"source", "prepare", "pretrain", "semisup", "fewshot", "report"} <= {name.split("@")[0] for name in STAGES}
    for name, stage in STAGES.items():
        assert module_file(stage_module(stage)), f"{name}: {stage_module(stage)} is not a module under src/"


def test_deps_cover_every_module_each_stage_imports():
    uncovered, missing, extra = {}, {}, {}
    for name, stage in STAGES.items():
        deps = dep_paths(stage)
        files = closure_files(stage_module(stage))
        if gaps := sorted(f for f in files if not covered(f, deps)):
            uncovered[name] = gaps
        if gone := [d for d in deps if d.startswith("src/") and not (REPO / d).exists()]:
            missing[name] = gone
        code = {p.relative_to(REPO).as_posix() for d in deps if d.startswith("src/") for p in
                ([REPO / d] if (REPO / d).is_file() else (REPO / d).rglob("*.py"))}
        if over := sorted(code - files):
            extra[name] = over
    assert not missing, f"dvc.yaml deps that do not exist: {missing}"
    assert not uncovered, "dvc.yaml: a stage runs code its deps do not cover (an edit would not re-run it); add to its deps:\n" + "\n".join(
        f"  {name}:\n" + "\n".join(f"      - {f}" for f in files) for name, files in uncovered.items()
    )
    if extra:  # only needless re-runs: worth knowing, not a failure
        warnings.warn(f"dvc.yaml deps a stage never imports (edits re-run it for nothing): {extra}", stacklevel=1)


@pytest.mark.parametrize("stage", sorted(n for n in STAGES if n.startswith("pretrain@")))
def test_pretraining_never_depends_on_semisupervised_code(stage):
    """An edit to FixMatch & co. must not re-run pretraining: it neither imports that code nor
    lists it (or a folder holding it) among its deps."""
    semisup_stage = STAGES[next(n for n in STAGES if n.startswith("semisup@"))]
    semisup_files = {module_file(m).relative_to(REPO).as_posix() for m in import_closure(stage_module(semisup_stage))
                     if SEMISUP_NAME.search(m.removeprefix("lowlabel"))}
    assert {"src/lowlabel/methods/semisup/fixmatch.py", "src/lowlabel/train/semisup.py", "src/lowlabel/methods/semisup/freematch.py"} <= semisup_files
    imported = sorted(m for m in import_closure(stage_module(STAGES[stage])) if SEMISUP_NAME.search(m.removeprefix("lowlabel")))
    assert not imported, f"{stage} imports semi-supervised modules: {imported}"
    listed = sorted(f for f in semisup_files if covered(f, dep_paths(STAGES[stage])))
    assert not listed, f"{stage}'s deps cover semi-supervised files: {listed}"


@pytest.mark.parametrize("stage", sorted(n for n in STAGES if n.startswith(("semisup@", "meta@"))))
def test_semisupervised_and_meta_training_never_depend_on_self_supervised_code(stage):
    """An edit to MoCo & co. re-runs the pretraining that uses it, not the stages after it (they
    read its encoder, a dep of theirs): they neither import SSL method code nor list it."""
    ssl_files = {module_file(m).relative_to(REPO).as_posix() for m in import_closure("lowlabel.methods.ssl")
                 if m.startswith("lowlabel.methods.ssl")}
    assert "src/lowlabel/methods/ssl/moco.py" in ssl_files
    imported = sorted(m for m in import_closure(stage_module(STAGES[stage])) if m.startswith("lowlabel.methods.ssl"))
    assert not imported, f"{stage} imports self-supervised modules: {imported}"
    listed = sorted(f for f in ssl_files if covered(f, dep_paths(STAGES[stage])))
    assert not listed, f"{stage}'s deps cover self-supervised files: {listed}"


def test_the_preflight_table_agrees_with_the_semisup_registry():
    """Preflight (run by pretrain too) reads which methods need unlabeled images from a table in
    lowlabel.config, which imports no semi-supervised code; it must say what the methods say."""
    from lowlabel.config import SEMISUP_USES_UNLABELED
    from lowlabel.methods.semisup import SEMISUP_REGISTRY

    assert {name: spec.uses_unlabeled for name, spec in SEMISUP_REGISTRY.items()} == SEMISUP_USES_UNLABELED


def test_the_closure_follows_every_kind_of_import(tmp_path):
    """The walker itself: submodules named in ``from`` imports, relative and function-level
    imports, parent ``__init__`` files; not ``if TYPE_CHECKING:`` imports nor other packages."""
    pkg = tmp_path / "lowlabel"
    for rel, text in {
        "__init__.py": "",
        "a/__init__.py": "from lowlabel.a import sub\n",
        "a/sub.py": "from . import sibling\nfrom ..b.leaf import thing\n",
        "a/sibling.py": "import os\ndef f():\n    import lowlabel.c.lazy\n",
        "b/__init__.py": "",
        "b/leaf.py": "thing = 1\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lowlabel.d\n",
        "c/__init__.py": "",
        "c/lazy.py": "",
        "d.py": "",
        "e.py": "",
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    assert import_closure("lowlabel.a", tmp_path) == {
        "lowlabel", "lowlabel.a", "lowlabel.a.sub", "lowlabel.a.sibling", "lowlabel.b", "lowlabel.b.leaf", "lowlabel.c", "lowlabel.c.lazy",
    }
