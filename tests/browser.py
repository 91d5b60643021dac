"""Open a page in headless Chromium with networking off and return the DOM after its scripts ran: a local HTML file
(`render_offline`), or a page of a server on this machine's loopback address (`render_live`)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# Belt and braces: even where no network namespace can be made, every request goes to a dead proxy.
NO_NETWORK_FLAGS = (
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)


def chromium() -> str | None:
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


def _offline_prefix() -> list[str]:
    """`unshare -n` (root) or `unshare -rn` (user namespaces): a process with no network interface but loopback."""
    unshare = shutil.which("unshare")
    if unshare:
        for prefix in ([unshare, "-n"], [unshare, "-rn"]):
            if subprocess.run([*prefix, "true"], capture_output=True).returncode == 0:
                return prefix
    return []


def _dump_dom(prefix: list[str], network_flags: tuple[str, ...], url: str, budget_ms: int) -> str:
    """The DOM of `url` once its scripts ran; virtual time stands still while a request is pending, so `budget_ms`
    counts the page's own timers, not a slow server."""
    browser = chromium()
    assert browser, "no Chromium on PATH"
    with tempfile.TemporaryDirectory() as profile:
        cmd = [
            *prefix,
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *network_flags,
            f"--virtual-time-budget={budget_ms}",
            "--dump-dom",
            url,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"chromium failed ({result.returncode}): {result.stderr[-2000:]}"
    return result.stdout


def render_offline(page: Path, budget_ms: int = 15000) -> str:
    return _dump_dom(_offline_prefix(), NO_NETWORK_FLAGS, page.resolve().as_uri(), budget_ms)


# The network as render_offline cuts it, but for 127.0.0.1 itself: Chromium sends loopback requests past any proxy,
# so only the local server answers; every other address has no route (the dead proxy) and no name resolves.
LOOPBACK_ONLY_FLAGS = ("--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")


def render_live(url: str, budget_ms: int = 15000) -> str:
    """The DOM of a page served on 127.0.0.1 (no network namespace: the server lives in this one)."""
    assert url.startswith("http://127.0.0.1:"), url
    return _dump_dom([], LOOPBACK_ONLY_FLAGS, url, budget_ms)


class _Charts(HTMLParser):
    """For each chart container (a div whose id a vegaEmbed call names), whether a non-empty canvas or an SVG with
    marks was drawn inside it."""

    def __init__(self, ids: set[str]) -> None:
        super().__init__()
        self.charts: dict[str, bool] = {}
        self.ids = ids
        self._stack: list[str | None] = []  # per open <div>: the chart id it opens, else None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "div":
            opens = a.get("id") in self.ids
            self._stack.append(a["id"] if opens else None)
            if opens:
                self.charts.setdefault(a["id"], False)
            return
        current = next((c for c in reversed(self._stack) if c), None)
        if current is None:
            return
        drawn = tag == "canvas" and int(a.get("width") or 0) > 0 and int(a.get("height") or 0) > 0
        drawn |= tag == "svg" and "marks" in (a.get("class") or "")
        if drawn:
            self.charts[current] = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._stack:
            self._stack.pop()


def chart_ids(html: str) -> set[str]:
    """The containers a page's scripts draw charts into: vegaEmbed('#id', ...)."""
    return set(re.findall(r"vegaEmbed\(\s*['\"]#([^'\"]+)['\"]", html))


def rendered_charts(page: Path) -> dict[str, bool]:
    """Chart id -> whether it drew, for every chart the page means to draw, after Chromium ran it offline."""
    parser = _Charts(chart_ids(page.read_text()))
    parser.feed(render_offline(page))
    return parser.charts
