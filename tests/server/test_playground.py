"""The playground page at / in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by selenium, against live servers on the tiny random checkpoint.

A screenshot of a finished chat is written to tests/artifacts/playground.png.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from engine.async_engine import AsyncEngine
from server.app import create_app
from server.playground import CSP
from server.state import ServerSettings

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Without the background-networking flags Chromium's own connections are refused in the sandbox.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,800")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
WAIT_S = 30


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.fail("headless Chromium is missing: apt-get install chromium chromium-driver (.ci/run does it)")
    profile = tempfile.mkdtemp(prefix="falcon-serve-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for get_log
    # An explicit driver path: selenium then never tries to download one.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], object], timeout: float = WAIT_S):
    return WebDriverWait(driver, timeout, poll_frequency=0.02).until(condition)


def open_page(driver: WebDriver, url: str) -> None:
    driver.get(url)
    wait_for(driver, lambda d: d.find_element(By.ID, "model").get_attribute("value"))  # models loaded


def fill(driver: WebDriver, **fields: str) -> None:
    for element_id, value in fields.items():
        element = driver.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(value)


def send(driver: WebDriver, text: str) -> WebElement:
    """Type a message, press Enter; the new reply's box."""
    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    fill(driver, prompt=text + "\n")
    return wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant")[before:])[0]


def content(reply: WebElement) -> str:
    return reply.find_element(By.CLASS_NAME, "content").get_attribute("textContent")


def wait_state(driver: WebDriver, reply: WebElement, state: str) -> None:
    wait_for(driver, lambda d: reply.get_attribute("data-state") != "streaming")
    assert reply.get_attribute("data-state") == state, content(reply)


def api_chat(url: str, body: dict, api_key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_page_is_served_with_csp_and_without_the_key(start_server) -> None:
    live = start_server(api_key="secret")
    for path in ("/", "/playground"):
        r = httpx.get(live.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert r.headers["content-security-policy"] == CSP and 'src="static/playground.js"' in r.text
    for asset in ("playground.js", "playground.css", "favicon.svg"):
        assert httpx.get(f"{live.url}/static/{asset}").status_code == 200, asset
    assert httpx.get(live.url + "/v1/models").status_code == 401  # the API itself stays closed
    assert httpx.get(live.url + "/metrics").status_code == 200


def test_disable_playground_gives_404(checkpoint: Path) -> None:
    settings = ServerSettings(served_model_names=["m"], model_path=str(checkpoint), playground=False)
    app = create_app(settings, load_engine=lambda: pytest.fail("not loaded: the lifespan does not run here"))

    async def statuses() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
            return [(await http.get(path)).status_code
                    for path in ("/", "/playground", "/static/playground.js", "/metrics")]

    assert asyncio.run(statuses()) == [404, 404, 404, 200]


def console_errors(driver: WebDriver) -> list[str]:
    """Errors logged in the page's console since the last call (script errors, CSP refusals, 404s)."""
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_chat_streams_with_the_settings_and_fills_the_stats(browser: WebDriver, server) -> None:
    console_errors(browser)
    open_page(browser, server.url + "/")
    options = [o.get_attribute("value") for o in browser.find_elements(By.CSS_SELECTOR, "#model option")]
    assert options == ["tiny-falcon", "alias"]

    settings = {"temperature": 0.8, "top_p": 0.9, "seed": 11, "max_tokens": 40}
    system, user = "You are terse.", "Hello there"
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    free = api_chat(server.url, {"messages": messages, **settings})["choices"][0]["message"]["content"]
    # A stop string that cuts this very reply: two ASCII letters from its middle.
    stop = next(free[i:i + 2] for i in range(5, len(free) - 1) if free[i:i + 2].isascii() and free[i:i + 2].isalpha())
    expected = api_chat(server.url, {"messages": messages, **settings, "stop": [stop]})
    assert expected["choices"][0]["message"]["content"] != free

    fill(browser, system=system, **{k: str(v) for k, v in settings.items()}, **{"stop-strings": stop})
    reply = send(browser, user)
    wait_state(browser, reply, "done")
    assert content(reply) == expected["choices"][0]["message"]["content"]
    stats = reply.find_element(By.CLASS_NAME, "stats").text
    usage = expected["usage"]
    assert "TTFT " in stats and "finish: stop" in stats
    assert (f"{usage['prompt_tokens']} prompt + {usage['completion_tokens']} completion = "
            f"{usage['total_tokens']} tokens") in stats
    if usage["completion_tokens"] > 1:
        assert " tokens/s" in stats

    # The second turn carries the first (the page keeps the conversation).
    second = send(browser, "And then?")
    wait_state(browser, second, "done")
    messages += [{"role": "assistant", "content": content(reply)}, {"role": "user", "content": "And then?"}]
    expected = api_chat(server.url, {"messages": messages, **settings, "stop": [stop]})
    assert content(second) == expected["choices"][0]["message"]["content"]

    # The live server view has polled /metrics and drawn the chart.
    wait_for(browser, lambda d: "tokens/s" in d.find_element(By.ID, "metric-throughput").text)
    wait_for(browser, lambda d: d.find_element(By.ID, "metric-running").text == "0")
    assert browser.find_element(By.ID, "metric-kv").text.endswith("%")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "playground.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert console_errors(browser) == []


STEP_DELAY_S = 0.005


@pytest.fixture(scope="module")
def slow_server(start_server, loader):
    """The real engine, pausing STEP_DELAY_S before each step: a 2000-token stream then lasts about 10 s
    however fast the CPU is, long enough to watch it in the live view and to stop it with a click."""

    def load() -> AsyncEngine:
        engine = loader()()
        step = engine.engine.step

        def slow_step() -> list:
            time.sleep(STEP_DELAY_S)
            return step()

        engine.engine.step = slow_step
        return engine

    return start_server(load=load)


def test_stop_button_aborts_the_request(browser: WebDriver, slow_server) -> None:
    server = slow_server
    aborts = server.metric("falcon_serve:request_success_total", finished_reason="abort")
    open_page(browser, server.url + "/playground")
    # Greedy from "Go on" on this checkpoint meets no EOS in 2000 tokens.
    fill(browser, temperature="0", max_tokens="2000")
    reply = send(browser, "Go on")
    wait_for(browser, lambda d: content(reply))
    assert server.metric("falcon_serve:num_requests_running") == 1  # text shows while it still runs
    # The live view shows it running in one of the 32 state slots.
    wait_for(browser, lambda d: d.find_element(By.ID, "metric-running").text == "1")
    assert browser.find_element(By.ID, "metric-slots").text == f"{100 / 32:.1f} %"
    browser.find_element(By.ID, "stop").click()
    wait_state(browser, reply, "stopped")
    server.wait_idle()
    assert server.metric("falcon_serve:request_success_total", finished_reason="abort") == aborts + 1
    assert server.metric("falcon_serve:kv_cache_usage_perc") == 0
    assert server.metric("falcon_serve:state_slots_usage_perc") == 0
    assert "finish: stopped" in reply.find_element(By.CLASS_NAME, "stats").text
    assert browser.find_element(By.ID, "send").is_enabled()
    wait_for(browser, lambda d: d.find_element(By.ID, "metric-running").text == "0")

    fill(browser, max_tokens="5")  # and the next message is answered
    wait_state(browser, send(browser, "again"), "done")


def test_a_refused_request_shows_the_servers_message(browser: WebDriver, server) -> None:
    open_page(browser, server.url + "/")
    fill(browser, temperature="-1")
    reply = send(browser, "hi")
    wait_state(browser, reply, "error")
    assert content(reply).startswith("400: ") and "temperature" in content(reply)
    fill(browser, temperature="0", max_tokens="2.5")  # refused by the page itself: nothing is sent
    browser.find_element(By.ID, "prompt").send_keys("hi\n")
    notice = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".message.error:not(.assistant)"))
    assert [content(n) for n in notice] == ["max_tokens must be an integer"]
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "hi"  # kept, to send once fixed
    fill(browser, max_tokens="3")  # the failed turns left the conversation intact
    wait_state(browser, send(browser, "hi"), "done")


HTML_REPLY = ('<script>window.injected = "script"</script><img src="x" onerror="window.injected = \'img\'">'
              "<b>bold</b> &amp; **markdown**")


class ScriptedText:
    """Stands in for LLMEngine.step: the real step, whose reply text is replaced by HTML_REPLY, a few
    characters per generated token (the rest with the last one). Tokens, usage, timing and finishing
    stay the engine's own: only the text is scripted, since a random-weight model cannot write markup."""

    def __init__(self, step: Callable[[], list]) -> None:
        self.step = step
        self.pieces: dict[tuple[str, int], list[str]] = {}  # (request id, sample index) -> text still to send

    def __call__(self) -> list:
        outputs = self.step()
        for out in outputs:
            pieces = self.pieces.setdefault((out.request_id, out.index),
                                            [HTML_REPLY[i:i + 7] for i in range(0, len(HTML_REPLY), 7)])
            if out.finished:
                out.new_text = "".join(pieces)
                pieces.clear()
            elif out.new_token_ids:
                out.new_text = pieces.pop(0) if pieces else ""
        return outputs


def test_html_in_a_reply_is_shown_as_text(browser: WebDriver, start_server, loader) -> None:
    def load() -> AsyncEngine:
        engine = loader()()
        engine.engine.step = ScriptedText(engine.engine.step)
        return engine

    live = start_server(load=load)
    open_page(browser, live.url + "/")
    fill(browser, max_tokens="8")
    reply = send(browser, "<i>user markup</i> too")
    wait_state(browser, reply, "done")
    assert content(reply) == HTML_REPLY
    assert browser.find_elements(By.CSS_SELECTOR, ".message.user .content")[-1].get_attribute(
        "textContent") == "<i>user markup</i> too"
    # Nothing became an element, and nothing ran.
    assert browser.find_elements(By.CSS_SELECTOR, "#messages .content *") == []
    assert browser.execute_script("return window.injected") is None


def test_api_key_is_asked_for_and_kept_for_the_session(browser: WebDriver, start_server) -> None:
    live = start_server(api_key="sesame")
    browser.get(live.url + "/")
    dialog = browser.find_element(By.ID, "key-dialog")
    wait_for(browser, lambda d: dialog.is_displayed())

    fill(browser, **{"api-key": "wrong"})
    browser.find_element(By.ID, "key-submit").click()
    wait_for(browser, lambda d: "refused" in d.find_element(By.ID, "key-error").text)
    assert dialog.is_displayed() and browser.find_elements(By.CSS_SELECTOR, "#model option") == []

    fill(browser, **{"api-key": "sesame"})
    browser.find_element(By.ID, "key-submit").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "model").get_attribute("value") == "tiny-falcon")
    assert not dialog.is_displayed()
    fill(browser, max_tokens="6", temperature="0")
    reply = send(browser, "hi")
    wait_state(browser, reply, "done")
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0}
    assert content(reply) == api_chat(live.url, body, api_key="sesame")["choices"][0]["message"]["content"]

    # Kept for this tab only: sessionStorage, not localStorage or cookies; a reload needs no prompt.
    assert browser.execute_script("return sessionStorage.getItem('falcon-serve-api-key')") == "sesame"
    assert browser.execute_script("return localStorage.length") == 0 and browser.get_cookies() == []
    open_page(browser, live.url + "/")
    assert not browser.find_element(By.ID, "key-dialog").is_displayed()
