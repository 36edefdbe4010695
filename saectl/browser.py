"""Chromium and the user's browser, for the dashboard: a screenshot in headless Chromium
(README's pictures, tests) and `--open` where a graphical browser exists."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import webbrowser
from pathlib import Path

from saectl.errors import NotFoundError, SaectlError

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless Chromium without a sandbox, GPU, first-run UI or any network chatter.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """The path of a Chromium-family browser on PATH, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def screenshot(html: Path, png: Path, width: int = 1200, height: int = 900,
               timeout: float = 90.0, feature: int | None = None) -> Path:
    """Render the page `html` in headless Chromium and save a `width`x`height` PNG of it
    (after the page's scripts ran: Chromium shoots once the load event has fired), showing
    `feature`'s panel if given."""
    exe = find_chromium()
    if exe is None:
        raise NotFoundError("chromium is not installed (apt-get install chromium); "
                            "it is needed to take a screenshot of the dashboard")
    html, png = Path(html).absolute(), Path(png).absolute()
    if not html.is_file():
        raise NotFoundError(f"no page at {html}; write it first with write_dashboard")
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="saectl-chromium-",
                                     ignore_cleanup_errors=True) as profile:
        tmp = png.with_name(f".{png.name}.tmp.png")
        tmp.unlink(missing_ok=True)
        cmd = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--screenshot={tmp}",
               f"--window-size={width},{height}",
               html.as_uri() + ("" if feature is None else f"#f={feature}")]
        try:
            proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                                  timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            tmp.unlink(missing_ok=True)
            raise SaectlError(f"chromium took over {timeout:.0f}s to screenshot {html}; "
                              "try again on a less busy machine") from None
        if not tmp.is_file() or tmp.stat().st_size == 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            raise SaectlError(f"chromium wrote no screenshot of {html} "
                              f"(exit {proc.returncode}: {tail})")
        os.replace(tmp, png)
    return png


def open_in_browser(path: Path) -> bool:
    """Open the page where a graphical browser can exist; False (and nothing opened) on a
    headless machine, where a text browser would take over the terminal."""
    if not (sys.platform in ("darwin", "win32") or os.environ.get("DISPLAY")
            or os.environ.get("WAYLAND_DISPLAY")):
        return False
    return webbrowser.open(Path(path).absolute().as_uri())
