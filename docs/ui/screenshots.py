"""Screenshots of each page of `sftlab ui` for the README, taken in headless Chromium.

    python docs/ui/screenshots.py --runs runs --run demo --out docs/ui     (= make ui-screenshots)

Serves the UI over RUNS on 127.0.0.1, opens Runs, Data, Eval, Chat (sends one message and waits
for the streamed reply) and New run, and writes OUT/<page>.png, palette-reduced to stay small.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from PIL import Image

from sftlab.infer.server import BackgroundServer
from sftlab.ui import CHROMIUM, CHROMIUM_ARGS
from sftlab.ui.app import create_ui_app

def shrink(path: Path) -> None:
    """256 colours: a UI screenshot loses nothing visible and shrinks about 3x."""
    with Image.open(path) as image:
        image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs")
    parser.add_argument("--run", default="demo")
    parser.add_argument("--out", default="docs/ui")
    parser.add_argument("--message", default="Give me three tips for staying focused while studying.")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = args.run
    with BackgroundServer(create_ui_app(args.runs)) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.on("pageerror", lambda exc: print("page error:", exc))

        def shot(name: str) -> None:
            time.sleep(0.4)  # let the charts settle
            path = out / f"{name}.png"
            page.screenshot(path=str(path))
            shrink(path)
            print(f"{path}: {path.stat().st_size // 1024} KB")

        page.goto(f"{server.url}/#/runs")
        page.wait_for_selector('.chart[data-metric="loss"] canvas')
        shot("runs")
        page.goto(f"{server.url}/#/data/{run}")
        page.wait_for_selector(".example")
        page.locator("h3", has_text="Lengths").evaluate("e => e.scrollIntoView({block: 'start'})")
        shot("data")
        page.goto(f"{server.url}/#/eval/{run}")
        page.wait_for_selector(".eval-report")
        shot("eval")
        page.goto(f"{server.url}/#/chat/{run}")
        page.check("#show-prompt")
        page.fill("#message", args.message)
        page.click("#send")
        page.wait_for_selector(".msg.assistant.done", timeout=120_000)
        shot("chat")
        page.goto(f"{server.url}/#/new")
        page.fill('input[name="name"]', "my-run")
        page.click("#draft")
        page.wait_for_function("document.querySelector('#yaml').value.includes('output_dir')")
        shot("new-run")
        browser.close()


if __name__ == "__main__":
    main()
