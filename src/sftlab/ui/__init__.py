"""`sftlab ui`: a local web dashboard over a folder of runs (see sftlab.ui.app)."""

import os

# Headless Chromium for the page's own browser checks (tests/test_ui_browser.py, docs/ui/screenshots.py):
# Debian's package, and the flags a closed network needs (no background connections) when run as root.
CHROMIUM = os.environ.get("SFTLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
