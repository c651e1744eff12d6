#!/usr/bin/env python3
"""Screenshots of a `dfpipe report` folder in headless Chromium, to look at a report the way a user's browser shows
it (Debian: `apt-get install chromium`).

    python scripts/screenshot_report.py REPORT_DIR OUT_DIR [--pages N]

writes OUT_DIR/index.png and one PNG per video page (the first N by name), and prints their paths. Exit 2 when no
Chromium is installed.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WINDOW = (1200, 1800)


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(browser: str, page: Path, png: Path, window: tuple[int, int] = WINDOW) -> Path:
    """One full-window PNG of a local page. No sandbox: containers run as root, where Chromium refuses one."""
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size={window[0]},{window[1]}", f"--screenshot={png}", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    if not png.is_file():
        raise RuntimeError(f"{browser} wrote no screenshot of {page}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--pages", type=int, default=3, help="video pages to screenshot (default 3)")
    args = parser.parse_args(argv)
    browser = find_browser()
    if browser is None:
        print(f"no Chromium found (looked for {', '.join(BROWSERS)})", file=sys.stderr)
        return 2
    if not (args.report / "index.html").is_file():
        print(f"{args.report}: no index.html (not a dfpipe report folder)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    pages = [args.report / "index.html", *sorted((args.report / "videos").glob("*.html"))[:args.pages]]
    for page in pages:
        print(screenshot(browser, page, args.out / f"{page.stem}.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
