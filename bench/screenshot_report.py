"""Render an HTML report in headless Chromium and save a PNG screenshot (to check it renders offline).

    python bench/screenshot_report.py runs/demo/report.html
    python bench/screenshot_report.py runs/uce-triangle/report.html --out shot.png --width 1200 --height 3000

Chromium runs with no network access to anything but the file itself (``--disable-background-networking``,
a throwaway profile), so a page that needs a server or an external asset shows up broken in the shot.
Prints one JSON record: the PNG's path, its size in pixels and bytes, and the seconds Chromium took.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium executable: ``explicit``, else the first of :data:`CANDIDATES` on the PATH."""
    for name in (explicit,) if explicit else CANDIDATES:
        path = shutil.which(name) if name else None
        if path:
            return path
    raise FileNotFoundError(
        f"No Chromium found (tried {explicit or ', '.join(CANDIDATES)}); install chromium or pass --chromium PATH."
    )


def screenshot(
    html: str | Path,
    out: str | Path,
    *,
    width: int = 1200,
    height: int = 3000,
    chromium: str | None = None,
    timeout: float = 120.0,
) -> dict:
    """Screenshot ``html`` (a local file) at ``width`` x ``height`` into the PNG ``out``; returns its facts."""
    src = Path(html).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"No HTML file at {str(src)!r}.")
    if width < 100 or height < 100:
        raise ValueError(f"--width and --height must be >= 100 pixels, got {width} x {height}.")
    dst = Path(out).resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    exe = find_chromium(chromium)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="erasekit-chromium-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={dst}",
            f"--window-size={width},{height}",
            src.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if not dst.exists():
        raise RuntimeError(f"Chromium wrote no screenshot (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    from PIL import Image

    with Image.open(dst) as im:
        size = im.size
    return {"png": str(dst), "pixels": list(size), "bytes": dst.stat().st_size, "seconds": round(time.time() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", type=Path, help="The HTML file to render (e.g. RUN_DIR/report.html).")
    ap.add_argument("--out", type=Path, default=None, help="PNG to write (default: beside the HTML, .png).")
    ap.add_argument("--width", type=int, default=1200, help="Window width in pixels.")
    ap.add_argument("--height", type=int, default=3000, help="Window height in pixels (the shot is cut there).")
    ap.add_argument("--chromium", default=None, help="Chromium executable (default: found on the PATH).")
    args = ap.parse_args(argv)
    out = args.out if args.out is not None else args.html.with_suffix(".png")
    try:
        info = screenshot(args.html, out, width=args.width, height=args.height, chromium=args.chromium)
    except (FileNotFoundError, ValueError, RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
