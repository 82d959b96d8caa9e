"""The house rules of ``shared/design/architecture.md``, checked on the source (data flows down, dependencies point
down; one concept per module; only the CLI prints or plots).

- ``pgvar.estimators`` imports torch and numpy only: no SB3, no gymnasium, no upper floor of pgvar;
- ``pgvar.measure`` and ``pgvar.problems`` import no algorithm, comparison, rollout, callback or CLI module;
- no module imports a private module (``_x``) or a private name of another package folder; the ground floor
  (``pgvar._validation``, ``pgvar._io``, ``pgvar._sb3_policy``, ``pgvar._testing``) is shared by everyone;
- only ``pgvar.cli`` prints or plots (SB3's ``verbose`` convention excepted: a ``print`` under ``if ...verbose``);
- no module over 600 lines.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pgvar"
MODULES = sorted(PACKAGE.rglob("*.py"))
GROUND_FLOOR = {"pgvar._validation", "pgvar._io", "pgvar._sb3_policy", "pgvar._testing"}
UPPER_FLOORS = ("pgvar.algos", "pgvar.compare", "pgvar.rollouts", "pgvar.callbacks", "pgvar.experiments",
                "pgvar.checkpoint", "pgvar.cli", "pgvar.zoo")  # fmt: skip
MAX_LINES = 600


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_folder(path: Path) -> str:
    """The dotted name of the folder a module lives in (``pgvar.algos`` for ``pgvar/algos/ppo.py``)."""
    return ".".join(path.relative_to(PACKAGE.parent).parent.parts)


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, imported names)`` of every import statement, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package_folder(path).split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, module]) if module else ".".join(base)
            found.append((module, [alias.name for alias in node.names]))
    return found


def _in(module: str, prefixes: tuple[str, ...] | set[str]) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def modules_under(folder: str) -> list[Path]:
    return [path for path in MODULES if module_name(path) == folder or module_name(path).startswith(folder + ".")]


@pytest.mark.parametrize("path", modules_under("pgvar.estimators"), ids=module_name)
def test_estimators_import_torch_and_numpy_only(path):
    for module, _ in imports(path):
        assert not _in(module, ("stable_baselines3", "sb3_contrib", "gymnasium", *UPPER_FLOORS)), module
        assert not _in(module, ("pgvar.measure", "pgvar.problems")), module


@pytest.mark.parametrize("path", modules_under("pgvar.measure") + modules_under("pgvar.problems"), ids=module_name)
def test_measure_and_problems_import_no_upper_floor(path):
    for module, _ in imports(path):
        assert not _in(module, UPPER_FLOORS), module


def test_importing_the_estimators_loads_no_sb3_or_gymnasium():
    code = "import sys, pgvar.estimators; print(sorted(m for m in ('stable_baselines3', 'gymnasium') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent)  # fmt: skip
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_private_module_or_name_of_another_package_folder(path):
    own_folder = package_folder(path)
    for module, names in imports(path):
        if not module.startswith("pgvar") or _in(module, GROUND_FLOOR):
            continue
        parts = module.split(".")
        private_at = [i for i, part in enumerate(parts) if part.startswith("_")]
        if private_at:
            folder = ".".join(parts[: private_at[0]])
            assert folder == own_folder, f"{module_name(path)} imports the private module {module}"
        imported_folder = ".".join(parts) if (PACKAGE.parent / Path(*parts)).is_dir() else ".".join(parts[:-1])
        for name in names:
            if name.startswith("_") and not name.startswith("__") and imported_folder != own_folder:
                raise AssertionError(f"{module_name(path)} imports the private name {name} from {module}")


def _prints_outside_verbose(tree: ast.AST) -> list[int]:
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            ancestor = parents.get(node)
            while ancestor is not None and not (isinstance(ancestor, ast.If) and "verbose" in ast.unparse(ancestor.test)):
                ancestor = parents.get(ancestor)
            if ancestor is None:
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("path", [p for p in MODULES if not _in(module_name(p), ("pgvar.cli",))], ids=module_name)
def test_only_the_cli_prints_or_plots(path):
    tree = ast.parse(path.read_text())
    assert _prints_outside_verbose(tree) == [], f"{module_name(path)} prints"
    for module, _ in imports(path):
        assert not _in(module, ("matplotlib", "rich", "tqdm")), f"{module_name(path)} imports {module}"


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_no_module_over_600_lines(path):
    n_lines = len(path.read_text().splitlines())
    assert n_lines <= MAX_LINES, f"{module_name(path)} has {n_lines} lines (one concept per module)"
