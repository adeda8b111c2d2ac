"""Open the chat page of a running server in headless Chromium, chat, and save a screenshot.

    python scripts/serve_openai_api.py --out_dir out --model_mode 2 &
    python scripts/chat_screenshot.py --url http://127.0.0.1:8998 --out docs/serve_chat.png "你是谁？" "请背诵李白的《静夜思》。"

Uses Debian's browser (apt-get install chromium chromium-driver; nothing downloads a browser of its own),
driven by Selenium. tests/test_serve.py drives the page with the same two functions.
"""
import argparse
import os
import sys

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def open_browser(width=1000, height=760, chromium=CHROMIUM, chromedriver=CHROMEDRIVER):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # --no-sandbox: Chromium's sandbox refuses to run as root (CI containers); headless needs no GPU.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def set_field(driver, name, value):
    box = driver.find_element("id", name)
    box.clear()
    box.send_keys(str(value))


def ask(driver, text, timeout=120):
    """Type `text` + Enter in the page, wait for the whole answer; return (answer, every text the answer
    bubble showed while it streamed)."""
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    script = driver.execute_script
    # A MutationObserver records each update of the newest answer bubble.
    script("""window.shown = [];
              if (!window.watching) {
                window.watching = new MutationObserver(() => {
                  const b = [...document.querySelectorAll('.assistant')].pop();
                  if (b) window.shown.push(b.textContent); });
                window.watching.observe(document.getElementById('messages'),
                                        {subtree: true, childList: true, characterData: true});
              }""")
    driver.find_element("id", "prompt").send_keys(text + Keys.ENTER)
    WebDriverWait(driver, timeout).until(lambda d: script(
        "return window.shown.length > 0 && document.querySelectorAll('.streaming').length === 0 && "
        "!document.getElementById('send').disabled"))
    answer = script("const b = [...document.querySelectorAll('.assistant')].pop(); return b ? b.textContent : null")
    return answer, script("return window.shown")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("prompts", nargs="+", help="the user's turns, in order")
    ap.add_argument("--url", default="http://127.0.0.1:8998")
    ap.add_argument("--out", default="docs/serve_chat.png")
    ap.add_argument("--temperature", default="0.85")
    ap.add_argument("--max_tokens", default="200")
    args = ap.parse_args()
    if not os.path.exists(CHROMIUM):
        sys.exit(f"no {CHROMIUM}: apt-get install chromium chromium-driver")
    driver = open_browser()
    try:
        driver.get(args.url + "/")
        set_field(driver, "temperature", args.temperature)
        set_field(driver, "max_tokens", args.max_tokens)
        for prompt in args.prompts:
            answer, _ = ask(driver, prompt)
            print(f"> {prompt}\n{answer}")
        driver.save_screenshot(args.out)
        print(f"saved {args.out}", file=sys.stderr)
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
