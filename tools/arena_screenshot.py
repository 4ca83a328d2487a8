"""Drive the web page of a running `fedit serve` in headless Chromium: the arena view asks a
held-out test question of two or more models, waits for their streamed answers and saves a
screenshot; the vote view casts blind votes (`drive_votes`). The browser tests use both; the
README's picture comes from the first:

    fedit serve fedit=runs/quickstart --port 8000 &
    python tools/arena_screenshot.py http://127.0.0.1:8000 --models base fedit \
        --out docs/arena.png

Needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# The machine may have no route out: Chromium must not try to reach anything but the page.
FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


def drive_arena(
    url: str,
    models: list[str],
    shot: Path,
    chromium: str,
    driver: str,
    question: bool = True,
    timeout: float = 600.0,
) -> dict[str, dict[str, Any]]:
    """Ask `models` one prompt on the arena view; {model: {text, stats, reference}}."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, profile = _browser(chromium, driver)
    try:
        browser.get(f"{url}/#arena")
        wait = WebDriverWait(browser, timeout)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        for box in browser.find_elements(By.CSS_SELECTOR, "#arena-models input"):
            if (box.get_attribute("value") in models) != box.is_selected():
                box.click()
        if question:
            browser.find_element(By.ID, "arena-question").click()
            wait.until(lambda b: b.find_element(By.ID, "arena-prompt").get_attribute("value"))
        else:
            browser.find_element(By.ID, "arena-prompt").send_keys("Name three rivers in Europe.")
        browser.find_element(By.ID, "arena-ask").click()
        cards = "#arena-answers .answer"
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, cards)) == len(models))
        wait.until(
            lambda b: all(
                c.get_attribute("data-done") == "1" for c in b.find_elements(By.CSS_SELECTOR, cards)
            )
        )
        time.sleep(0.3)  # the last repaint
        reference = browser.find_element(By.ID, "arena-reference-text").text
        out = {}
        for card in browser.find_elements(By.CSS_SELECTOR, cards):
            out[str(card.get_attribute("data-model"))] = {
                "text": card.find_element(By.CSS_SELECTOR, ".text").text,
                "stats": card.find_element(By.CSS_SELECTOR, ".stats").text,
                "reference": reference,
            }
        # The whole page, however long the answers ran.
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1400, max(900, min(int(height) + 40, 4000)))
        shot.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(shot))
        return out
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _browser(chromium: str, driver: str) -> tuple[Any, str]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    profile = tempfile.mkdtemp(prefix="fedit-chromium-")
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options), profile


def drive_votes(
    url: str, winners: list[str], chromium: str, driver: str, timeout: float = 600.0
) -> list[dict[str, str]]:
    """On the vote view, one battle per entry of `winners` (a, b, tie or bad): a held-out
    question to two hidden models, both answers awaited, that vote cast; what each vote
    revealed ({winner, result})."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, profile = _browser(chromium, driver)
    try:
        browser.get(f"{url}/#vote")
        wait = WebDriverWait(browser, timeout)
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-ready"))
        out = []
        for n, winner in enumerate(winners, start=1):
            browser.find_element(By.ID, "vote-question").click()
            wait.until(lambda b: b.find_element(By.ID, "vote-prompt").get_attribute("value"))
            browser.find_element(By.ID, "vote-ask").click()
            button = f"#vote-buttons button[data-winner='{winner}']"
            wait.until(lambda b, sel=button: b.find_element(By.CSS_SELECTOR, sel).is_enabled())
            heads = browser.find_elements(By.CSS_SELECTOR, "#view-vote .answer h3")
            hidden = [h.text for h in heads]
            browser.find_element(By.CSS_SELECTOR, button).click()
            wait.until(lambda b, n=n: b.find_element(By.ID, "vote-result").get_attribute(
                "data-voted") == str(n))  # fmt: skip
            result = browser.find_element(By.ID, "vote-result").text
            out.append({"winner": winner, "hidden": " / ".join(hidden), "result": result})
        return out
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    ap.add_argument("--models", nargs="+", required=True, help="two or more served model names")
    ap.add_argument("--out", type=Path, default=Path("docs/arena.png"))
    ap.add_argument("--prompt", action="store_true", help="a fixed prompt, not a test question")
    args = ap.parse_args()
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        print(
            "needs chromium and chromedriver: apt-get install -y chromium chromium-driver",
            file=sys.stderr,
        )
        return 2
    answers = drive_arena(args.url, args.models, args.out, chromium, driver, not args.prompt)
    print(json.dumps(answers, indent=2, ensure_ascii=False))
    print(f"screenshot: {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
