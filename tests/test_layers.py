"""The packages form layers, checked by parsing every import (also the ones inside functions):

    front       vta_sam                                 the `vta-sam` command; nothing imports it
    stages      preprocess (one)  train (two)  eval     eval may use train (to sample); no other crossing
    models      audio_models                            AudioLDM front end, VAE, vocoder: stage one and eval
    bottom      common                                  flags, devices, weights folder, versions
    contract    shards                                  the shard files: the only door to them

A package imports only from its own layer's allowed list below, no module imports itself back through others
(no cycles), and only `shards` opens shard files (tarfile, webdataset).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shards", "common", "audio_models", "preprocess", "train", "eval", "vta_sam")
# package -> the packages of ours it may import (besides itself)
ALLOWED = {
    "shards": set(),
    "common": {"shards"},
    "audio_models": {"common", "shards"},
    "preprocess": {"audio_models", "common", "shards"},
    "train": {"audio_models", "common", "shards"},
    "eval": {"audio_models", "common", "shards", "train"},
    "vta_sam": {"audio_models", "common", "shards", "preprocess", "train", "eval"},
}
SHARD_READERS = {"tarfile", "webdataset"}  # modules that open shard files: only `shards` may import them


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    return {module_name(p, root): p for package in packages for p in sorted((root / package).rglob("*.py"))}


def imported(path: Path, name: str) -> Iterator[tuple[str, int]]:
    """(absolute name as written, line) of every import in a file, relative ones resolved; `from X import Y`
    gives X.Y (Y may be a submodule or a name in X: `import_graph` takes the longest known module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                yield f"{source}.{alias.name}", node.lineno


def import_graph(root: Path, packages: tuple[str, ...]) -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Edges module -> module of ours it imports (the most specific module named), and every (module, imported
    name, line) including third-party ones."""
    known = modules(root, packages)
    edges: dict[str, set[str]] = {name: set() for name in known}
    seen: list[tuple[str, str, int]] = []
    for name, path in known.items():
        for target, line in imported(path, name):
            seen.append((name, target, line))
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                edges[name].add(target)
    return edges, seen


def layer_violations(root: Path, allowed: dict[str, set[str]], readers: set[str]) -> list[str]:
    edges, seen = import_graph(root, tuple(allowed))
    problems = []
    for module, target, line in seen:
        top, other = module.split(".")[0], target.split(".")[0]
        if other in allowed and other != top and other not in allowed[top]:
            problems.append(f"{module}:{line} imports {target} ({top} may import {sorted(allowed[top]) or 'nothing of ours'})")
        if other in readers and top != "shards":
            problems.append(f"{module}:{line} imports {target}: only shards opens shard files")
    return sorted(set(problems))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_every_package_stays_in_its_layer() -> None:
    assert layer_violations(ROOT, ALLOWED, SHARD_READERS) == []


def test_no_import_cycles() -> None:
    edges, _ = import_graph(ROOT, PACKAGES)
    assert cycles(edges) == []


def test_only_the_front_imports_the_front() -> None:
    assert all("vta_sam" not in allowed for package, allowed in ALLOWED.items() if package != "vta_sam")
    _, seen = import_graph(ROOT, PACKAGES)
    assert not [(m, t) for m, t, _ in seen if t.split(".")[0] == "vta_sam" and m.split(".")[0] != "vta_sam"]


def test_the_checks_find_what_they_look_for(tmp_path: Path) -> None:
    """A crossing, a cycle (through a function-level import) and a tar reader outside shards are all reported."""
    files = {
        "shards/__init__.py": "",
        "shards/io.py": "import tarfile\n",
        "eval/__init__.py": "",
        "eval/a.py": "from eval import b\nfrom preprocess.video import decode\n",
        "eval/b.py": "def f():\n    from .a import x\n",
        "preprocess/__init__.py": "",
        "preprocess/video.py": "import webdataset as wds\n",
    }
    for relative, text in files.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(text)
    allowed = {"shards": set(), "preprocess": {"shards"}, "eval": {"shards"}}
    problems = layer_violations(tmp_path, allowed, SHARD_READERS)
    assert any(p.startswith("eval.a:2 imports preprocess.video") for p in problems)
    assert any(p.startswith("preprocess.video:1 imports webdataset") for p in problems)
    assert not any(p.startswith("shards") for p in problems)
    edges, _ = import_graph(tmp_path, tuple(allowed))
    assert cycles(edges) == [["eval.a", "eval.b"]]


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_says_what_it_is(package: str) -> None:
    """The README's Architecture section names every package, and every package has a docstring."""
    init = ROOT / package / "__init__.py"
    assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"
    architecture = (ROOT / "README.md").read_text(encoding="utf-8").split("## Architecture", 1)[1].split("\n## ", 1)[0]
    assert f"`{package}`" in architecture
