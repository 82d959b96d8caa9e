"""The documentation is tested like code.

(a) ``sphinx-build -W`` succeeds: no warning (a broken cross-reference, a docstring that is not valid reST, a
    missing ``literalinclude`` target, an undocumented public name, a broken internal link of the built HTML)
    gets through, and the examples gallery has a page per example;
(b) every ``examples/*.py`` script runs (in its small ``PGVAR_EXAMPLE_SMOKE=1`` version), so the code the docs
    show by ``literalinclude`` is code that works;
(c) every name in ``__all__`` of ``pgvar.estimators``, ``pgvar.measure`` and ``pgvar.problems`` is documented in
    ``docs/api.md`` (rlax's coverage check; the same helpers also run inside the Sphinx build).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_DIR = REPO_ROOT / "docs"
EXAMPLES = sorted((REPO_ROOT / "examples").glob("*.py"))
COVERED_MODULES = ["pgvar.estimators", "pgvar.measure", "pgvar.problems"]


def _load_module(name: str, path: Path):
    """A module of docs/ (not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(f"pgvar_docs_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # a dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


coverage_check = _load_module("coverage_check", DOCS_DIR / "_ext" / "coverage_check.py")
internal_links = _load_module("internal_links", DOCS_DIR / "_ext" / "internal_links.py")


def _subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # Import the checkout under test, installed or not; one thread each (the suite runs on 2 shared cores).
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["MPLBACKEND"] = "Agg"
    env.update(extra)
    return env


# ------------------------------------------------------------------------------------------------ (a) build
# The example that draws a figure: the docs build below executes it, to check that the gallery shows its plot.
GALLERY_EXECUTED = "gradient_variance_callback"


def _copy_of_the_sources(destination: Path) -> Path:
    """docs/, examples/, pgvar/ and results/ (the committed plots the pages show) copied, so that sphinx-gallery
    (which writes docs/gallery/ next to the sources and skips the examples whose output it has cached there) runs
    afresh and leaves the checkout alone."""
    ignore = shutil.ignore_patterns("__pycache__", "_build", "gallery", "sg_execution_times.rst", "*.zip", "*.ckpt")
    for folder in ("docs", "examples", "pgvar", "results"):
        shutil.copytree(REPO_ROOT / folder, destination / folder, ignore=ignore)
    return destination / "docs"


@pytest.fixture(scope="module")
def docs_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One ``sphinx-build -W`` of a copy of the sources, shared by the tests of the built site."""
    tmp_path = tmp_path_factory.mktemp("docs_build")
    docs = _copy_of_the_sources(tmp_path / "src")
    command = [
        sys.executable, "-m", "sphinx",
        "-W", "--keep-going",   # every warning is an error, and all of them are reported
        "-b", "html",
        "-d", str(tmp_path / "doctrees"),
        "-q",
        str(docs), str(tmp_path / "html"),
    ]  # fmt: skip
    # The gallery executes one example (the one with a figure); every example runs in test_example_runs_in_smoke_mode.
    env = _subprocess_env(PGVAR_DOCS_GALLERY_RUN=f"{GALLERY_EXECUTED}\\.py$")
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    return result, tmp_path / "html"


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(docs_build: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    result, html = docs_build
    assert result.returncode == 0, f"sphinx-build failed:\n{result.stderr[-6000:]}\n{result.stdout[-2000:]}"
    tmp_path = html.parent
    # Every internal link resolves (the internal_links extension warned otherwise, which -W made an error).
    assert internal_links.broken_internal_links(tmp_path / "html") == []
    # The gallery: a page per example, linked from the landing page, with the executed example's figure.
    gallery = tmp_path / "html" / "gallery"
    for script in EXAMPLES:
        assert (gallery / f"{script.stem}.html").is_file(), script.name
    assert 'href="gallery/index.html"' in (tmp_path / "html" / "index.html").read_text(encoding="utf-8")
    figure = f"sphx_glr_{GALLERY_EXECUTED}_001.png"
    assert (tmp_path / "html" / "_images" / figure).is_file()
    assert figure in (gallery / f"{GALLERY_EXECUTED}.html").read_text(encoding="utf-8")
    for page in ("index", "api", "guide/returns", "guide/baselines", "guide/measuring"):
        assert (tmp_path / "html" / f"{page}.html").is_file(), page
    api_html = (tmp_path / "html" / "api.html").read_text(encoding="utf-8")
    # autodoc really ran (an import failure would leave the page without the functions' docstrings).
    assert "Schulman" in api_html and "Greensmith" in api_html
    # Math renders offline: MathJax is served from the build itself, never from a CDN.
    qprop_html = (tmp_path / "html" / "guide" / "qprop.html").read_text(encoding="utf-8")
    assert 'src="../_static/mathjax/tex-chtml.js"' in qprop_html
    assert (tmp_path / "html" / "_static" / "mathjax" / "tex-chtml.js").is_file()
    for page in (tmp_path / "html").rglob("*.html"):
        assert "cdn.jsdelivr.net/npm/mathjax" not in page.read_text(encoding="utf-8"), page


@pytest.mark.slow
def test_math_is_typeset_offline_in_a_headless_browser(
    docs_build: tuple[subprocess.CompletedProcess[str], Path],
) -> None:
    screenshots = _load_module("screenshots", DOCS_DIR / "screenshots.py")
    browser = screenshots.find_browser()
    if browser is None:
        pytest.skip("no Chromium on PATH (docs/screenshots.py needs one)")
    result, html = docs_build
    assert result.returncode == 0, "the docs build failed (see test_sphinx_build_has_no_warnings)"
    # No network in the browser: MathJax must come from the build; every formula typeset, none left as TeX.
    check = screenshots.check_page(html, "guide/qprop", browser)
    assert check.typeset > 50 and check.raw_tex == 0, check


# --------------------------------------------------------------------------------------------- (b) examples
def test_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {"estimators_tour.py", "measure_policy_gradient.py"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_runs_in_smoke_mode(script: Path, tmp_path: Path) -> None:
    # Run from an empty folder, so that a script that writes files leaves nothing in the checkout.
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=_subprocess_env(PGVAR_EXAMPLE_SMOKE="1"),
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stderr[-6000:]}\n{result.stdout[-2000:]}"


# --------------------------------------------------------------------------------------------- (c) coverage
@pytest.mark.parametrize("module_name", COVERED_MODULES)
def test_public_names_are_documented_in_api_page(module_name: str) -> None:
    module = coverage_check.load_public_module(module_name)
    if module is None:
        pytest.skip(f"{module_name} does not exist yet")
    documented = coverage_check.names_documented_in((DOCS_DIR / "api.md").read_text(encoding="utf-8"))
    missing, _ = coverage_check.undocumented_names([module_name], documented)
    assert not missing, f"in {module_name}.__all__ but not documented in docs/api.md: {missing}"


def test_coverage_config_matches_the_test() -> None:
    conf = (DOCS_DIR / "conf.py").read_text(encoding="utf-8")
    for module_name in COVERED_MODULES:
        assert f'"{module_name}"' in conf, module_name
    assert '"coverage_check"' in conf


def test_coverage_parser_reads_rest_and_myst_directives() -> None:
    text = """
```{eval-rst}
.. currentmodule:: pkg.alpha

.. autofunction:: first

.. autoclass:: Second
   :members:
```

```{autofunction} pkg.beta.third
```

```{currentmodule} pkg.gamma
```

```{autodata} FOURTH
```

```{eval-rst}
.. py:data:: Fifth
   :type: int
```

.. autosummary::

   not_documented_by_a_summary
"""
    assert coverage_check.names_documented_in(text) == {
        "pkg.alpha.first",
        "pkg.alpha.Second",
        "pkg.beta.third",
        "pkg.gamma.FOURTH",
        "pkg.gamma.Fifth",
    }


def test_coverage_check_reports_a_missing_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    def documented_function() -> None: ...

    def re_exported_function() -> None: ...

    def forgotten_function() -> None: ...

    fake = types.ModuleType("pgvar_fake_public_module")
    fake.__file__ = "pgvar_fake_public_module.py"
    fake.__all__ = ["documented_function", "re_exported_function", "forgotten_function", "FORGOTTEN_CONSTANT"]
    fake.documented_function = documented_function
    fake.re_exported_function = re_exported_function
    fake.forgotten_function = forgotten_function
    fake.FORGOTTEN_CONSTANT = ("a", "b")
    defining = types.ModuleType("pgvar_fake_public_module_impl")
    defining.re_exported_function = re_exported_function
    defining.OTHER_NAME = fake.FORGOTTEN_CONSTANT  # the same object under another short name does not count
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(sys.modules, defining.__name__, defining)
    monkeypatch.setattr(
        coverage_check, "load_public_module", lambda name: fake if name == fake.__name__ else None
    )

    documented = {
        "pgvar_fake_public_module.documented_function",
        "pgvar_fake_public_module_impl.re_exported_function",  # the same function under its defining module
        "pgvar_fake_public_module_impl.OTHER_NAME",
    }
    missing, skipped = coverage_check.undocumented_names(
        [fake.__name__, "pgvar_module_that_does_not_exist"], documented
    )
    assert missing == [
        "pgvar_fake_public_module.forgotten_function",
        "pgvar_fake_public_module.FORGOTTEN_CONSTANT",
    ]
    assert skipped == ["pgvar_module_that_does_not_exist"]


# ------------------------------------------------------------------------------ (d) statements kept true
def _first_bash_line_after(text: str, marker: str) -> str:
    """The first line of the first ```bash block after ``marker`` in ``text``."""
    rest = text[text.index(marker) :]
    block = rest[rest.index("```bash\n") + len("```bash\n") :]
    return block.splitlines()[0].strip()


def test_install_page_set_up_command_equals_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    install = (DOCS_DIR / "guide" / "install.md").read_text(encoding="utf-8")
    readme_command = _first_bash_line_after(readme, "Set up")
    install_command = _first_bash_line_after(install, "## From a checkout")
    assert install_command == readme_command
    # torch and pgvar in one pip call (a separate `pip install torch` would be a second command).
    assert install_command.count("pip install") == 1 and '"torch==' in install_command


def test_install_page_states_example_times_that_the_examples_give() -> None:
    install = (DOCS_DIR / "guide" / "install.md").read_text(encoding="utf-8")
    assert "under 20 seconds" not in install
    for script in EXAMPLES:
        docstring = script.read_text(encoding="utf-8").split('"""')[1]
        if "minute" in docstring and script.name in install:
            # a time the page quotes for a script is the one its docstring gives
            line = next(line for line in docstring.splitlines() if "minute" in line)
            minutes = [word for word in line.replace("(", " ").split() if word[:1].isdigit()]
            assert any(number in install for number in minutes), (script.name, line)


_NUMBER_WORDS = {
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
}


def test_compare_guide_counts_the_estimators() -> None:
    from pgvar.cli.compare import ESTIMATORS

    compare = (DOCS_DIR / "guide" / "compare.md").read_text(encoding="utf-8")
    row = next(line for line in compare.splitlines() if line.startswith("| `--estimators"))
    words = [word for word in row.lower().split() if word in _NUMBER_WORDS]
    assert words and _NUMBER_WORDS[words[0]] == len(ESTIMATORS), row
    for page in DOCS_DIR.rglob("*.md"):
        text = page.read_text(encoding="utf-8").lower()
        for word, number in _NUMBER_WORDS.items():
            if number != len(ESTIMATORS):
                assert f"{word} estimators" not in text, (page.name, word)


def test_every_algorithm_has_a_module_page_and_an_overview_row() -> None:
    overview = (DOCS_DIR / "modules" / "overview.md").read_text(encoding="utf-8")
    pages = {path.read_text(encoding="utf-8") for path in (DOCS_DIR / "modules").glob("*.md")}
    for name in ("PPO", "A2C", "TRPO", "QPropPPO", "QPropTRPO", "EntropyPG", "SoftQ"):
        assert f"| `{name}` |" in overview, name
        assert any(f"autoclass:: pgvar.{name}" in page or f"autoclass:: pgvar.algos.qprop.{name}" in page
                   for page in pages), name  # fmt: skip


def test_landing_page_shows_the_drop_in_import_and_a_citation() -> None:
    index = (DOCS_DIR / "index.md").read_text(encoding="utf-8")
    import pgvar

    assert "from pgvar import PPO" in index
    assert "@software{" in index and f"version = {{{pgvar.__version__}}}" in index


# ------------------------------------------------------------------------------------------ (e) the gallery
@pytest.mark.parametrize("script", EXAMPLES, ids=[path.name for path in EXAMPLES])
def test_example_docstring_starts_with_a_gallery_title(script: Path) -> None:
    # sphinx-gallery takes the page title from the docstring's first reST section title.
    lines = script.read_text(encoding="utf-8").split('"""')[1].splitlines()
    assert len(lines) > 3 and lines[0].strip(), script.name
    assert lines[1] == "=" * len(lines[0]) and lines[2] == "", (script.name, lines[:3])


def test_gallery_runs_the_small_examples_and_keeps_its_output_out_of_git() -> None:
    conf = (DOCS_DIR / "conf.py").read_text(encoding="utf-8")
    assert '"sphinx_gallery.gen_gallery"' in conf and '"internal_links"' in conf
    assert 'os.environ.setdefault("PGVAR_EXAMPLE_SMOKE", "1")' in conf
    assert (REPO_ROOT / "examples" / "GALLERY_HEADER.rst").is_file()
    gitignore = (REPO_ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    assert "docs/gallery/" in gitignore


def test_full_example_leaves_the_tracked_docs_figure_alone_unless_asked() -> None:
    source = (REPO_ROOT / "examples" / "gradient_variance_callback.py").read_text(encoding="utf-8")
    # the docs' figure is written only under PGVAR_UPDATE_DOCS_IMAGES=1; by default into the current directory
    assert 'os.environ.get("PGVAR_UPDATE_DOCS_IMAGES") == "1"' in source
    assert "elif UPDATE_DOCS_IMAGES:" in source and "out_dir = Path.cwd()" in source


# ----------------------------------------------------------------------------------- (f) the link checker
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_link_checker_finds_missing_files_and_anchors(tmp_path: Path) -> None:
    _write(tmp_path / "_static" / "style.css", "")
    _write(tmp_path / "sub" / "page.html", '<h1 id="top">t</h1><a name="old-style"></a><a href="../index.html#intro">up</a>')
    _write(
        tmp_path / "index.html",
        '<section id="intro"><link href="_static/style.css?v=1234" rel="stylesheet">'
        '<a href="sub/page.html#top">ok</a> <a href="sub/page.html#old-style">ok</a> <a href="#intro">ok</a>'
        '<a href="https://example.org/x.html#nothing">external</a> <a href="mailto:a@b.c">mail</a>'
        '<a href="sub/">a folder</a>'
        '<a href="sub/page.html#gone">bad anchor</a> <a href="missing.html">bad file</a>'
        '<img src="_images/missing.png"> <a href="#nowhere">bad local anchor</a></section>',
    )
    _write(tmp_path / "sub" / "index.html", "<p>folder index</p>")
    assert internal_links.broken_internal_links(tmp_path) == [
        "index.html: #nowhere (no id 'nowhere' in index.html)",
        "index.html: _images/missing.png (no such file)",
        "index.html: missing.html (no such file)",
        "index.html: sub/page.html#gone (no id 'gone' in sub/page.html)",
    ]
    with pytest.raises(ValueError, match="html_dir"):
        internal_links.broken_internal_links(tmp_path / "nope")
