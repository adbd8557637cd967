"""Checks on the built HTML book (``make book`` writes it to ``_build/html``).

The static checks read the HTML files. The browser checks open the pages in headless
Chromium at a 1280 x 900 viewport with every request outside localhost refused (the
network is off). One asserts that MathJax typeset the math from the book's own copy and
that every figure decoded; the other, that every page renders inside its content column
without horizontal scrolling: no formula, table, code or output block and no image is
wider than the column, and none scrolls inside its own box either. Screenshots of every
page are saved under ``_build/screenshots`` for a person to look at.

``TYPSAMP_BOOK_HTML`` points the checks at another build (for instance
``jupyter-book build . --path-output /tmp/book`` writes ``/tmp/book/_build/html``); the
screenshots then go to ``screenshots/`` beside that ``html/`` folder.

When the book is not built, or Chromium cannot be found or installed, these tests are
skipped with a message that says so; ``make test`` builds the book first.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("TYPSAMP_BOOK_HTML", ROOT / "_build" / "html")).resolve()
SCREENSHOTS = HTML.parent / "screenshots"
VIEWPORT = {"width": 1280, "height": 900}
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _toc_files() -> list[str]:
    files = [TOC["root"]]
    for part in TOC.get("parts", []):
        files += [chapter["file"] for chapter in part.get("chapters", [])]
    return files


CHAPTERS = [f for f in _toc_files() if f.startswith("notebooks/")]

needs_book = pytest.mark.skipif(
    not (HTML / "index.html").exists(),
    reason=f"the book is not built in {HTML}: run `make book` (make test does it first)",
)


@needs_book
@pytest.mark.book
@pytest.mark.parametrize("page", _toc_files())
def test_every_toc_page_is_built(page):
    assert (HTML / f"{page}.html").is_file(), f"{page}.html missing from _build/html"


RESULTS = sorted((ROOT / "notebooks" / "results").glob("*.json"))


@pytest.mark.parametrize("result", RESULTS, ids=[r.name for r in RESULTS])
def test_committed_results_come_from_a_clean_tree(result):
    # A measurement made with uncommitted code names a commit that does not hold the
    # code it timed; the book's chapters print these files as their evidence.
    import json

    machine = json.loads(result.read_text())["machine"]
    assert machine.get("commit", "unknown") != "unknown", f"{result.name} names no commit"
    assert machine.get("dirty") is False, (
        f"{result.name} was measured on a working tree with uncommitted changes "
        f"(commit {machine.get('commit', '?')[:12]}, dirty): re-run `make bench` on a clean checkout")


@needs_book
@pytest.mark.book
def test_mathjax_is_local_not_cdn():
    html = (HTML / "notebooks" / "01_temperature.html").read_text()
    scripts = re.findall(r'<script[^>]+src="([^"]*mathjax[^"]*)"', html, flags=re.I)
    assert scripts, "no MathJax script tag on chapter 1"
    for src in scripts:
        assert not src.startswith(("http:", "https:", "//")), f"MathJax loaded from the network: {src}"
        assert (HTML / "notebooks" / src.split("?")[0]).resolve().is_file(), f"{src} not in the built book"


@needs_book
@pytest.mark.book
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_has_download_button_and_no_dead_repository_link(chapter):
    html = (HTML / f"{chapter}.html").read_text()
    assert f"_sources/{chapter}.ipynb" in html, "no .ipynb download link"
    # The book has no public repository yet; a button to a placeholder URL would be a
    # dead link, so _config.yml leaves the repository button off.
    assert "btn-source-repository-button" not in html, "repository button points nowhere real"
    assert "github.com/typsamp" not in html, "placeholder repository URL in the page"


@needs_book
@pytest.mark.book
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_closes_with_what_we_verified(chapter):
    html = (HTML / f"{chapter}.html").read_text()
    assert "What we verified" in html


# ----------------------------------------------------------------------------------
# Headless Chromium


def _chromium() -> str:
    """Path to Debian's chromium; installed with apt-get when missing and we are root."""
    path = shutil.which("chromium")
    if path:
        return path
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("the browser check cannot run: chromium is not installed and apt-get "
                    "is not usable here (install Debian's `chromium` package)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"the browser check cannot run: `{' '.join(cmd)}` failed: {done.stderr[-500:]}")
    path = shutil.which("chromium")
    if not path:
        pytest.skip("the browser check cannot run: chromium still missing after apt-get install")
    return path


@pytest.fixture(scope="module")
def server():
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):      # one line per request would bury a failure's message
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    playwright = pytest.importorskip("playwright.sync_api", reason="the browser check needs `playwright` (pip)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS[1:])
        yield b
        b.close()


def _open(browser, server, page_path: str):
    """Open one built page offline; returns (context, page, blocked URLs)."""
    context = browser.new_context(viewport=VIEWPORT)
    blocked: list[str] = []

    def offline(route):
        url = route.request.url
        if url.startswith(server):
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    context.route("**/*", offline)
    page = context.new_page()
    page.goto(f"{server}/{page_path}.html", wait_until="load")
    return context, page, blocked


def _wait_for_math(page):
    page.wait_for_function(
        "() => window.MathJax && MathJax.startup && MathJax.startup.promise"
        " && document.querySelectorAll('mjx-container').length > 0",
        timeout=30_000,
    )
    page.evaluate("() => MathJax.startup.promise")


@needs_book
@pytest.mark.browser
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_renders_math_and_figures_offline(chapter, server, browser):
    context, page, blocked = _open(browser, server, chapter)
    _wait_for_math(page)
    math = page.evaluate("""() => ({
        typeset: document.querySelectorAll('mjx-container').length,
        errors: document.querySelectorAll('mjx-merror, .MathJax_Error').length,
        raw: [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container')).length,
    })""")
    figures = page.evaluate("""() => [...document.querySelectorAll('.cell_output img')]
        .map(img => ({src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0}))""")
    context.close()

    assert math["typeset"] >= 10, f"only {math['typeset']} typeset formulas on {chapter}"
    assert math["errors"] == 0, f"MathJax reported {math['errors']} errors"
    assert math["raw"] == 0, f"{math['raw']} math blocks were left untypeset"
    assert len(figures) >= 2, f"expected figures on {chapter}, found {len(figures)}"
    broken = [f["src"] for f in figures if not f["ok"]]
    assert not broken, f"figures that did not load: {broken}"
    # Fonts or scripts from a CDN would show up here; the page must not need them.
    assert not [u for u in blocked if "mathjax" in u.lower()], f"MathJax tried the network: {blocked}"


# Every element that can be wider than the text: typeset math, tables, code and output
# blocks, images, embedded HTML. An element overflows when its rendered extent (its box,
# what it scrolls inside its box, and for math the typeset formula itself, which MathJax
# lets spill out of its container) passes either edge of the content column (the
# article's content box, inside its padding: where the prose runs) by more than
# a pixel of rounding, or when it scrolls horizontally inside its own box: the page asks
# the reader not to scroll sideways anywhere. Only the innermost offending element is
# reported, with the TeX source or the start of its text and the section it is in.
OVERFLOW_JS = """() => {
    const column = document.querySelector('main article.bd-article') || document.querySelector('article');
    if (!column) return {column: null};
    const box = column.getBoundingClientRect(), style = getComputedStyle(column);
    const col = {left: box.left + parseFloat(style.paddingLeft), right: box.right - parseFloat(style.paddingRight)};
    col.width = col.right - col.left;                                   // the text's own width
    const tex = new Map();
    if (window.MathJax && MathJax.startup && MathJax.startup.document) {
        for (const item of MathJax.startup.document.math) tex.set(item.typesetRoot, item.math);
    }
    const SELECTOR = 'mjx-container, table, pre, img, svg, iframe, video, .cell_output, .output, '
        + 'div.highlight, div.math, .output_html, .text_html, dl, blockquote';
    const found = [];
    for (const el of column.querySelectorAll(SELECTOR)) {
        if (el.closest('mjx-container') && el.tagName !== 'MJX-CONTAINER') continue;   // MathJax's own svg/inner nodes
        const r = el.getBoundingClientRect();
        if (r.width === 0 && r.height === 0) continue;                                  // not displayed
        let left = r.left, right = r.left + Math.max(r.width, el.scrollWidth);
        if (el.tagName === 'MJX-CONTAINER') {
            // The drawn formula: the container's box and its typeset mjx-math (which can
            // spill out of a display container). Not scrollWidth: the hidden assistive
            // MathML inside an inline container inflates it without being drawn.
            right = r.right;
            const m = el.querySelector('mjx-math');
            if (m) {
                for (const mr of [m.getBoundingClientRect(), ...m.getClientRects()]) {
                    left = Math.min(left, mr.left); right = Math.max(right, mr.right);
                }
            }
        }
        // A formula's glyphs overhang its own box by a pixel or two (italic correction), so
        // for math only the typeset extent counts; the block that holds it is checked too.
        const inner = el.tagName !== 'MJX-CONTAINER' && el.clientWidth > 0 ? el.scrollWidth - el.clientWidth : 0;
        const past = Math.max(right - col.right, col.left - left);
        if (past > 1 || inner > 1) {
            const section = el.closest('section');
            let what = tex.get(el) || el.getAttribute('src') || el.textContent || '';
            what = what.replace(/\\s+/g, ' ').trim().slice(0, 90);
            found.push({el, tag: el.tagName.toLowerCase() + (el.className && typeof el.className === 'string'
                          ? '.' + el.className.trim().split(/\\s+/).slice(0, 2).join('.') : ''),
                        width: Math.round(right - left), past: Math.round(past), inner: Math.round(inner),
                        section: section ? section.id : '', what});
        }
    }
    const innermost = found.filter(f => !found.some(g => g !== f && f.el.contains(g.el)));
    return {
        column: Math.round(col.width),
        page: document.documentElement.scrollWidth,
        viewport: window.innerWidth,
        overflow: innermost.map(({el, ...rest}) => rest),
    };
}"""


def page_overflow(page) -> dict:
    """What on an open page is wider than its content column (see OVERFLOW_JS)."""
    return page.evaluate(OVERFLOW_JS)


def describe_overflow(result: dict) -> str:
    lines = [f"content column {result['column']} px, page {result['page']} px wide at a "
             f"{result['viewport']} px viewport; {len(result['overflow'])} element(s) too wide:"]
    for f in result["overflow"]:
        how = f"{f['past']} px past the column" if f["past"] > 1 else f"scrolls {f['inner']} px inside its box"
        lines.append(f"  <{f['tag']}> {f['width']} px wide, {how}, in #{f['section']}: {f['what']!r}")
    return "\n".join(lines)


@needs_book
@pytest.mark.browser
@pytest.mark.parametrize("page_path", _toc_files())
def test_page_fits_the_content_column(page_path, server, browser):
    context, page, _ = _open(browser, server, page_path)
    if page.evaluate("() => document.querySelectorAll('.math, .arithmatex').length > 0"):
        _wait_for_math(page)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{Path(page_path).name}.png"), full_page=True)
    result = page_overflow(page)
    context.close()

    assert result["column"], f"no content column (article) found on {page_path}"
    assert result["page"] <= result["viewport"], describe_overflow(result)
    assert not result["overflow"], describe_overflow(result)
