"""The package layout rules of docs/architecture.md, checked on the source: import layers, one video reader, short
functions. A change that breaks one of them fails here with the offending file and line."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "marlin"

# package -> layer; a module may import its own layer and the ones below (docs/architecture.md, "What may import what")
LAYERS = {
    "utils": 0, "models": 1, "mae": 1, "audio": 1, "face": 2, "video": 3, "data": 4, "viz": 5, "evaluate": 6,
    "train": 7, "sync": 7, "lipsync": 7, "commands": 8, "cli": 8, "__init__": 8,
}  # fmt: skip
# (importing module, imported package): documented exceptions
EXCEPTIONS = {
    ("marlin.models.model", "video"),  # the drop-in Marlin.extract_video (official API) runs the extraction pipeline
    ("marlin.video.extract", "viz"),  # `extract --preview`: contact sheets of the crops it made
}
MAX_FUNCTION_LINES = 80


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
        out.append((".".join(parts), path))
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every marlin import in the file, at any depth (function-level ones included)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import a, b: the submodules
                    found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
                    continue
            else:
                name = node.module or ""
            found.append((node.lineno, name))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name == "marlin" or name.startswith("marlin.")]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_the_layout_rules_read_a_real_package() -> None:
    modules = dict(_modules())
    assert len(modules) > 60 and "marlin.video.io" in modules and "marlin.train.engine" in modules
    assert set(_package(m) for m in modules) == set(LAYERS)  # a new top-level package must be given a layer


def test_no_module_imports_a_higher_layer() -> None:
    broken = []
    for module, path in _modules():
        own = LAYERS[_package(module)]
        for line, name in _imports(module, path):
            target = _package(name)
            if target in LAYERS and LAYERS[target] > own and (module, target) not in EXCEPTIONS:
                broken.append(f"{path.relative_to(SRC.parent)}:{line}: {module} (layer {own}) imports {name} "
                              f"(layer {LAYERS[target]})")  # fmt: skip
    assert not broken, "\n".join(broken)


def test_evaluate_never_imports_train() -> None:
    hits = [(m, name) for m, p in _modules() if _package(m) == "evaluate" for _, name in _imports(m, p)
            if _package(name) == "train"]  # fmt: skip
    assert not hits


def test_video_files_are_opened_in_one_module() -> None:
    """Only marlin.video.io imports PyAV: every other module reads video through it (rotation, errors, seeking)."""
    users = []
    for module, path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            if any(n == "av" or n.startswith("av.") for n in names):
                users.append(module)
    assert sorted(set(users)) == ["marlin.video.io"]


@pytest.mark.parametrize("module_path", [p for _, p in _modules()], ids=lambda p: str(p.relative_to(SRC.parent)))
def test_functions_are_short(module_path: Path) -> None:
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(module_path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]  # fmt: skip
    assert not long, f"{module_path.name}: split {', '.join(long)}"


def test_the_readme_and_the_architecture_page_name_every_module() -> None:
    """The README's layout section and docs/architecture.md list every module, so the map stays the territory."""
    repo = SRC.parents[1]
    readme = repo.joinpath("README.md").read_text()
    layout = readme[readme.index("- Layout:") : readme.index("- Tests:")]
    arch = repo.joinpath("docs", "architecture.md").read_text()
    for module, path in _modules():
        if path.name == "__init__.py" or _package(module) == "commands":
            continue
        name = path.stem
        assert f"`{name}`" in layout, f"README layout section does not name {module}"
        assert f"{name}.py" in arch, f"docs/architecture.md does not name {module}"
