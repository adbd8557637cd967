"""Checks on the built HTML book (``make book`` writes it to ``_build/html``).

The static checks read the HTML files. The browser check opens chapter pages in
headless Chromium with every request outside localhost refused (the network is off),
and asserts that MathJax typeset the math from the book's own copy and that every
figure decoded. It also saves a screenshot per page under ``_build/screenshots`` for a
person to look at.

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
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
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
    reason="the book is not built: run `make book` (make test does it first)",
)


@needs_book
@pytest.mark.book
@pytest.mark.parametrize("page", _toc_files())
def test_every_toc_page_is_built(page):
    assert (HTML / f"{page}.html").is_file(), f"{page}.html missing from _build/html"


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
def test_chapter_has_download_and_repository_buttons(chapter):
    html = (HTML / f"{chapter}.html").read_text()
    assert f"_sources/{chapter}.ipynb" in html, "no .ipynb download link"
    assert 'class="btn btn-sm btn-source-repository-button' in html, "no repository button"


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
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(HTML))
    handler.log_message = lambda *args: None
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


@needs_book
@pytest.mark.browser
@pytest.mark.parametrize("chapter", CHAPTERS)
def test_chapter_renders_math_and_figures_offline(chapter, server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
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
    page.goto(f"{server}/{chapter}.html", wait_until="load")
    page.wait_for_function(
        "() => window.MathJax && MathJax.startup && MathJax.startup.promise"
        " && document.querySelectorAll('mjx-container').length > 0",
        timeout=30_000,
    )
    page.evaluate("() => MathJax.startup.promise")
    math = page.evaluate("""() => ({
        typeset: document.querySelectorAll('mjx-container').length,
        errors: document.querySelectorAll('mjx-merror, .MathJax_Error').length,
        raw: [...document.querySelectorAll('.math')].filter(e => !e.querySelector('mjx-container')).length,
    })""")
    figures = page.evaluate("""() => [...document.querySelectorAll('.cell_output img')]
        .map(img => ({src: img.getAttribute('src'), ok: img.complete && img.naturalWidth > 0}))""")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{Path(chapter).name}.png"), full_page=True)
    context.close()

    assert math["typeset"] >= 10, f"only {math['typeset']} typeset formulas on {chapter}"
    assert math["errors"] == 0, f"MathJax reported {math['errors']} errors"
    assert math["raw"] == 0, f"{math['raw']} math blocks were left untypeset"
    assert len(figures) >= 2, f"expected figures on {chapter}, found {len(figures)}"
    broken = [f["src"] for f in figures if not f["ok"]]
    assert not broken, f"figures that did not load: {broken}"
    # Fonts or scripts from a CDN would show up here; the page must not need them.
    assert not [u for u in blocked if "mathjax" in u.lower()], f"MathJax tried the network: {blocked}"
