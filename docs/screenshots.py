"""Screenshots of the built docs in a headless browser with no network: the math must be typeset.

Opens pages of an HTML build as ``file://`` URLs in headless Chromium with every host name unresolvable (so
nothing can come from a CDN), lets MathJax run, and for each page

- saves a screenshot (``--out``, PNG), to look at;
- counts the formulas MathJax typeset (``<mjx-container>`` elements in the final DOM) and the formulas left
  as raw TeX (``\\(``, ``\\[`` and ``$$`` still in the page's text); a page with raw TeX left, or with no
  typeset formula, fails.

    sphinx-build -b html docs docs/_build/html
    python docs/screenshots.py                       # guide/baselines, guide/qprop, guide/regularization
    python docs/screenshots.py --out /tmp/screenshots --pages guide/returns modules/qprop

Needs Chromium (Debian: ``apt-get install chromium``); ``tests/test_docs.py`` runs it when Chromium is there.
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DOCS_DIR = Path(__file__).resolve().parent
DEFAULT_PAGES = ("guide/baselines", "guide/qprop", "guide/regularization")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# MathJax typesets inline math in \( \) and display math in \[ \] (Sphinx writes both); a typeset formula leaves
# none in the page text.
_RAW_TEX = re.compile(r"\\\(|\\\[|\$\$")


@dataclass(frozen=True)
class PageCheck:
    """What the browser made of one page."""

    page: str
    typeset: int  # <mjx-container> elements: formulas MathJax drew
    raw_tex: int  # TeX delimiters left in the visible text: formulas it did not draw
    screenshot: Path | None

    @property
    def ok(self) -> bool:
        return self.typeset > 0 and self.raw_tex == 0


def find_browser() -> str | None:
    """The path of a Chromium-like browser on ``PATH``, or ``None``."""
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _browser_command(browser: str, profile: str, virtual_time_ms: int) -> list[str]:
    return [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-default-apps", "--disable-extensions", "--mute-audio",
        # No network at all: every host name fails to resolve (a CDN script would not load).
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}", f"--virtual-time-budget={virtual_time_ms}",
    ]  # fmt: skip


def _visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style|mjx-assistive-mml|mjx-container)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    dom = re.sub(r"<(pre|code)\b.*?</\1>", " ", dom, flags=re.S | re.I)  # code may show TeX on purpose
    return html.unescape(re.sub(r"<[^>]+>", " ", dom))


def check_page(
    html_dir: Path,
    page: str,
    browser: str,
    out_dir: Path | None = None,
    window: tuple[int, int] = (1280, 2000),
    virtual_time_ms: int = 10_000,
    timeout_s: float = 120.0,
) -> PageCheck:
    """Open ``page`` of the build in the headless browser; count typeset and raw formulas; screenshot it.

    :param html_dir: the output folder of an HTML build.
    :param page: the page's name without ``.html`` (``guide/qprop``).
    :param browser: the browser's executable.
    :param out_dir: where the screenshot goes (``guide_qprop.png``); ``None``: no screenshot.
    :param window: the window size in pixels (width, height): the screenshot's size.
    :param virtual_time_ms: how long the page may run its scripts (virtual time: the browser does not wait).
    :param timeout_s: the wall-clock limit of each browser run.
    """
    path = (html_dir / f"{page}.html").resolve()
    if not path.is_file():
        raise ValueError(f"page must name a page of the build, got {page!r} (no {path})")
    url = path.as_uri()
    with tempfile.TemporaryDirectory(prefix="pgvar_chromium_") as profile:
        command = _browser_command(browser, profile, virtual_time_ms)
        dom = subprocess.run(
            [*command, "--dump-dom", url], capture_output=True, text=True, timeout=timeout_s, check=True
        ).stdout
    screenshot = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        screenshot = out_dir / f"{page.replace('/', '_')}.png"
        with tempfile.TemporaryDirectory(prefix="pgvar_chromium_") as profile:
            command = _browser_command(browser, profile, virtual_time_ms)
            subprocess.run(
                [*command, f"--screenshot={screenshot}", f"--window-size={window[0]},{window[1]}", url],
                capture_output=True, timeout=timeout_s, check=True,
            )  # fmt: skip
        if not screenshot.is_file():
            raise RuntimeError(f"{browser} wrote no screenshot of {page}")
    typeset = len(re.findall(r"<mjx-container\b", dom))
    raw_tex = len(_RAW_TEX.findall(_visible_text(dom)))
    return PageCheck(page=page, typeset=typeset, raw_tex=raw_tex, screenshot=screenshot)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=DOCS_DIR / "_build" / "html", help="the HTML build")
    parser.add_argument("--out", type=Path, default=Path("/tmp/screenshots"), help="folder for the PNGs")
    parser.add_argument("--pages", nargs="+", default=list(DEFAULT_PAGES), help="pages, without .html")
    parser.add_argument("--browser", default=None, help="the browser's executable (default: found on PATH)")
    args = parser.parse_args(argv)
    browser = args.browser or find_browser()
    if browser is None:
        print(f"no browser found (looked for {', '.join(BROWSERS)})", file=sys.stderr)
        return 2
    if not (args.html / "index.html").is_file():
        print(f"no HTML build in {args.html}: run  sphinx-build -b html docs {args.html}", file=sys.stderr)
        return 2
    failed = 0
    for page in args.pages:
        result = check_page(args.html, page, browser, out_dir=args.out)
        failed += not result.ok
        status = "ok" if result.ok else "FAILED"
        print(
            f"{status:6} {page}: {result.typeset} formulas typeset, {result.raw_tex} left as TeX -> {result.screenshot}"
        )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
