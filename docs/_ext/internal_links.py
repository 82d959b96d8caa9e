"""Sphinx extension: every internal link of the built HTML resolves, offline.

Sphinx's ``-b linkcheck`` goes online and checks external URLs; this check reads the HTML that the build wrote
and needs no network. After an HTML build it collects every ``href`` / ``src`` of every page that points inside
the site (no scheme, not ``//host``), and reports each one whose file does not exist or whose ``#fragment`` is
not an ``id`` (or ``<a name=...>``) in the target page. Each broken link is a Sphinx warning, so ``sphinx-build
-W`` fails on it (tests/test_docs.py).

Two kinds of broken links that ``sphinx.ext.viewcode`` writes itself (its bugs, not the docs') are repaired first:
a module it could not read (``builtins``, for a documented constant) listed in its index with no page, and a
``[docs]`` back link built from the first name under which a module was documented (``pgvar.algos.X``) for an
object documented under another name (``pgvar.algos.buffers.Y``) or again with ``:no-index:`` (no anchor).

MyST's ``myst_heading_anchors`` only warns about ``[text](#anchor)`` links it cannot resolve inside markdown; this
check also covers raw HTML, theme templates, sphinx-gallery's pages and viewcode's ``[docs]`` / ``[source]`` links.
"""

from __future__ import annotations

import posixpath
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

# Attributes that hold a URL the browser loads or follows.
_LINK_ATTRIBUTES = {("a", "href"), ("link", "href"), ("img", "src"), ("script", "src"), ("iframe", "src"),
                    ("source", "src"), ("area", "href")}  # fmt: skip


class _PageParser(HTMLParser):
    """The anchors (``id``, ``<a name>``) a page defines and the URLs it links to."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: set[str] = set()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if value is None:
                continue
            if name == "id" or (tag == "a" and name == "name"):
                self.anchors.add(value)
            elif (tag, name) in _LINK_ATTRIBUTES:
                self.links.append(value)


def _is_internal(url: str) -> bool:
    parts = urlsplit(url)
    return not (parts.scheme or parts.netloc or url.startswith("//"))


def _parse(path: Path) -> _PageParser:
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    parser.close()
    return parser


def broken_internal_links(html_dir: str | Path) -> list[str]:
    """Every internal link of the HTML pages under ``html_dir`` that does not resolve, as readable lines.

    A link resolves when its path (relative to the page, query string ignored) names an existing file, or a
    folder with an ``index.html``, and its fragment, if any, is an ``id`` or ``<a name>`` of the target page.

    :param html_dir: the output folder of an HTML build.
    :return: ``"page.html: link (why)"`` for each broken link, sorted; empty when all resolve.
    """
    root = Path(html_dir).resolve()
    if not root.is_dir():
        raise ValueError(f"html_dir must be an existing folder, got {str(html_dir)!r}")
    pages = {path.resolve(): _parse(path) for path in sorted(root.rglob("*.html"))}
    anchors_of: dict[Path, set[str]] = {path: parsed.anchors for path, parsed in pages.items()}
    broken: set[str] = set()
    for page, parsed in pages.items():
        name = page.relative_to(root).as_posix()
        for url in parsed.links:
            if not _is_internal(url):
                continue
            parts = urlsplit(url)
            path_part = unquote(parts.path)
            if path_part:
                # Resolve like a browser: relative to the page's folder ("/x" from the site root).
                base = "" if path_part.startswith("/") else posixpath.dirname(name)
                target_rel = posixpath.normpath(posixpath.join(base, path_part.lstrip("/")))
                if target_rel.startswith(".."):
                    broken.add(f"{name}: {url} (points outside the site)")
                    continue
                target = (root / target_rel).resolve()
                if target.is_dir():
                    target = target / "index.html"
                if not target.is_file():
                    broken.add(f"{name}: {url} (no such file)")
                    continue
            else:
                target = page
            fragment = unquote(parts.fragment)
            if not fragment or target.suffix != ".html":
                continue
            if target not in anchors_of:  # an HTML file outside the pages parsed above (not expected)
                anchors_of[target] = _parse(target).anchors
            if fragment not in anchors_of[target]:
                broken.add(f"{name}: {url} (no id {fragment!r} in {target.relative_to(root).as_posix()})")
    return sorted(broken)


def _drop_unreadable_viewcode_modules(app: Any) -> list[Any]:
    """Before viewcode writes its pages: drop the modules it could not read, which it would list with no page."""
    modules = getattr(app.env, "_viewcode_modules", None) or {}
    for modname in [name for name, entry in modules.items() if entry is False]:
        del modules[modname]
    return []


_BACKLINK = re.compile(r'<a class="viewcode-back" href="([^"#]*)#([^"]*)">([^<]*)</a>')


def _fix_viewcode_backlinks(app: Any) -> None:
    """Point each ``[docs]`` link of viewcode's source pages at the anchor the object really has.

    viewcode builds the link from the first name under which the module was documented (``pgvar.algos.X``),
    so an object of the same module documented under another name (``pgvar.algos.buffers.Y``), or documented
    as ``pgvar.EntropyPG`` and again with ``:no-index:``, gets a link to an anchor that does not exist. The
    link is pointed at the object's anchor on that page (an alias's ``node_id``), else anywhere; else removed.
    """
    modules = getattr(app.env, "_viewcode_modules", None) or {}
    objects = app.env.get_domain("py").objects
    root = Path(app.outdir)
    for modname, entry in modules.items():
        page = root / "_modules" / (modname.replace(".", "/") + ".html")
        if not entry or not page.is_file():
            continue
        _, _, used, refname = entry

        def replace(
            match: re.Match[str], modname: str = modname, used: dict = used, refname: str = refname
        ) -> str:
            href, fragment, text = match.groups()
            name = fragment.removeprefix(refname + ".")
            keys = [fragment, f"{modname}.{name}", *(key for key in objects if key.endswith("." + name))]
            entries = [objects[key] for key in keys if key in objects]
            # the object's entry on the page viewcode links to, else its entry anywhere (an alias: its node_id)
            found = [obj for obj in entries if obj.docname == used.get(name)] or entries
            if not found:
                return ""  # documented only with :no-index: (no anchor anywhere)
            docname, node_id = found[0].docname, found[0].node_id
            if docname == used.get(name) and node_id == fragment:
                return match.group(0)
            uri = app.builder.get_relative_uri(f"_modules/{modname.replace('.', '/')}", docname)
            return f'<a class="viewcode-back" href="{uri}#{node_id}">{text}</a>'

        html = page.read_text(encoding="utf-8")
        fixed = _BACKLINK.sub(replace, html)
        if fixed != html:
            page.write_text(fixed, encoding="utf-8")


def _check_after_build(app: Any, exception: Exception | None) -> None:
    if exception is not None or app.builder.format != "html":
        return
    _fix_viewcode_backlinks(app)
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for line in broken_internal_links(app.outdir):
        logger.warning(f"broken internal link: {line}", type="internal_links", subtype="broken")


def setup(app: Any) -> dict[str, Any]:
    # before viewcode's own handler (priority 500) writes the pages
    app.connect("html-collect-pages", _drop_unreadable_viewcode_modules, priority=400)
    app.connect("build-finished", _check_after_build)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
