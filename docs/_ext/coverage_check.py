"""API coverage check (after rlax's ``docs/ext/coverage_check.py``).

Every public name, i.e. every entry of ``__all__`` of the modules in the ``coverage_check_modules`` config value,
must be documented by an ``auto*`` (or hand-written ``py:*``) directive on the page ``coverage_check_docname``
(``api``), under its public path or, for a re-export, under the path of the module that defines it. The check runs
while Sphinx builds (so ``sphinx-build -W`` fails on a missing name) and the same helpers back the fast unit
test in ``tests/test_docs.py``, which reads ``docs/api.md`` without building.

A module that does not exist yet (not importable, or an empty namespace directory without ``__init__.py``) is
skipped with a log message: it cannot have public names to document. Any other import error is a warning.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Iterable
from types import ModuleType
from typing import Any

_AUTO_DIRECTIVES = ("autofunction", "autoclass", "autodata", "autoexception", "autoattribute", "automethod")
# A hand-written description (``.. py:data:: Params``) documents a name too.
_MANUAL_DIRECTIVES = ("function", "class", "data", "exception", "attribute", "method")
# `.. autofunction:: name` (reST, also inside {eval-rst}) or ```{autofunction} name``` (MyST).
_DIRECTIVE_RE = re.compile(
    r"^\s*(?:\.\.\s+(?P<rst>[a-z:]+)::|[`:]{3,}\{(?P<myst>[a-z:]+)\})\s*(?P<arg>\S+)?", re.MULTILINE
)


def load_public_module(module_name: str) -> ModuleType | None:
    """Import ``module_name`` and return it, or ``None`` when it does not exist (yet).

    An empty directory imports as a namespace package without ``__file__``; that also counts as "does not
    exist": there is no ``__init__.py`` to hold ``__all__``.
    """
    try:
        spec = importlib.util.find_spec(module_name)
    except ModuleNotFoundError:
        return None
    if spec is None:
        return None
    module = importlib.import_module(module_name)
    if getattr(module, "__file__", None) is None:
        return None
    return module


def public_names(module: ModuleType) -> list[str]:
    """The module's ``__all__`` as fully qualified names (``pgvar.estimators.gae_advantages``)."""
    names = getattr(module, "__all__", None)
    if names is None:
        raise ValueError(f"{module.__name__} defines no __all__; the coverage check needs one")
    return [f"{module.__name__}.{name}" for name in names]


def names_documented_in(text: str) -> set[str]:
    """Fully qualified names documented by ``auto*`` (or ``py:function``/``py:class``/...) directives in a page.

    Tracks ``currentmodule``/``module`` directives, so ``.. autofunction:: gae_advantages`` after
    ``.. currentmodule:: pgvar.estimators`` yields ``pgvar.estimators.gae_advantages``.
    """
    documented: set[str] = set()
    current_module = ""
    for match in _DIRECTIVE_RE.finditer(text):
        raw_directive = match.group("rst") or match.group("myst") or ""
        is_python_directive = raw_directive.startswith("py:")
        directive = raw_directive.removeprefix("py:")
        argument = match.group("arg") or ""
        if directive in ("currentmodule", "module", "automodule"):
            current_module = "" if argument in ("None", "") else argument
        elif (
            directive in _AUTO_DIRECTIVES or (is_python_directive and directive in _MANUAL_DIRECTIVES)
        ) and argument:
            # A dotted name is a full path (autodoc resolves it without the current module), as for functions
            # and classes; a bare name belongs to the current module.
            qualified = argument if "." in argument or not current_module else f"{current_module}.{argument}"
            documented.add(qualified)
    return documented


def resolve_name(qualified_name: str) -> Any:
    """The object a dotted name refers to (``pgvar.estimators.returns.gae_advantages``), or ``None``."""
    parts = qualified_name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute, None)
            if obj is None:
                return None
        return obj
    return None


def undocumented_names(module_names: Iterable[str], documented: set[str]) -> tuple[list[str], list[str]]:
    """``(missing, skipped_modules)``: public names not in ``documented`` and modules that do not exist yet.

    A re-exported object also counts as documented when the page documents the same object, under the same
    short name, at another path: ``pgvar.estimators.returns.gae_advantages`` documents the re-export
    ``pgvar.estimators.gae_advantages``.
    """
    documented_objects = set()
    for qualified_name in documented:
        obj = resolve_name(qualified_name)
        if obj is not None:
            documented_objects.add((qualified_name.rsplit(".", 1)[-1], id(obj)))
    missing: list[str] = []
    skipped: list[str] = []
    for module_name in module_names:
        module = load_public_module(module_name)
        if module is None:
            skipped.append(module_name)
            continue
        for name in public_names(module):
            short_name = name.rsplit(".", 1)[-1]
            obj = getattr(module, short_name, None)
            if name not in documented and (obj is None or (short_name, id(obj)) not in documented_objects):
                missing.append(name)
    return missing, skipped


def _check_coverage(app: Any, env: Any) -> None:
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    docname = app.config.coverage_check_docname
    python_objects = env.get_domain("py").objects
    documented = {name for name, entry in python_objects.items() if entry.docname == docname}
    try:
        missing, skipped = undocumented_names(app.config.coverage_check_modules, documented)
    except Exception as error:  # an import error in a module that exists is a real failure
        logger.warning("coverage_check: %s: %s", type(error).__name__, error, type="coverage_check")
        return
    for module_name in skipped:
        logger.info("coverage_check: %s does not exist yet; skipped", module_name)
    for name in missing:
        logger.warning(
            "coverage_check: %s is in __all__ but not documented in %s",
            name,
            env.doc2path(docname),
            type="coverage_check",
        )


def setup(app: Any) -> dict[str, Any]:
    app.add_config_value("coverage_check_modules", [], "env")
    app.add_config_value("coverage_check_docname", "api", "env")
    app.connect("env-check-consistency", _check_coverage)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
