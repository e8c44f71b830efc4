"""The playground page (GET /) in a real headless Chromium, against a real ``soar serve``.

The browser loads the page without a key, is given the key, types a two-line message (Shift+Enter
adds the line, Enter sends) and watches the reply stream into ``data-role="assistant"``; the
streamed text must equal what the official ``openai`` client gets for the same greedy request.
Needs Debian's ``chromium`` package (/usr/bin/chromium) and the ``playwright`` Python package
(`.ci/run` installs both; `playwright install` is never run: no browser is downloaded).
"""

from __future__ import annotations

import json
import os

import openai
import pytest

from tests.serve.conftest import start_soar_serve

pytestmark = pytest.mark.slow  # a browser and a server process

CHROMIUM = "/usr/bin/chromium"
KEY = "sk-playground-0001"

if not os.path.exists(CHROMIUM):
    pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium package "
                "(apt-get install chromium) to run the playground test", allow_module_level=True)
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is missing: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("playground")
    srv = start_soar_serve(str(tiny_model_dir), "--served-model-name", "tiny", "--no-access-log",
                           "--api-key", KEY, log_path=tmp / "server.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def test_chat_streams_the_same_reply_as_the_api(server, browser, tmp_path):
    page = browser.new_page()
    console = []
    page.on("console", lambda m: console.append(m.text))
    page.on("pageerror", lambda e: console.append(f"page error: {e}"))
    page.goto(server.base_url + "/")  # no key needed for the page itself
    page.wait_for_function("document.getElementById('status').textContent.includes('API key')")

    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector("body[data-models=loaded]")
    assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["tiny"]
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "12")

    page.click("#prompt")
    page.keyboard.type("def add(a, b):")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("    return")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.keyboard.press("Enter")
    body = json.loads(sent.value.post_data)
    assert sent.value.headers["authorization"] == f"Bearer {KEY}"
    assert body["messages"] == [{"role": "user", "content": "def add(a, b):\n    return"}]
    assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 12
    assert "response_format" not in body

    reply = page.locator('[data-role="assistant"]').first
    reply.wait_for()
    page.wait_for_selector('[data-role="assistant"][data-state="done"]', timeout=60_000)
    streamed = reply.get_attribute("data-text")

    api = openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)
    expected = api.chat.completions.create(model="tiny", messages=body["messages"],
                                           temperature=0, max_tokens=12)
    assert streamed and streamed == expected.choices[0].message.content
    assert reply.inner_text().strip()  # rendered
    speed = page.text_content("#speed")
    assert speed.startswith(f"{expected.usage.completion_tokens} tokens") and "tok/s" in speed

    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 0

    # JSON mode sends OpenAI's response_format, with the conversation so far
    page.check("#json-mode")
    page.click("#prompt")
    page.keyboard.type("as JSON please")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.keyboard.press("Enter")
    body = json.loads(sent.value.post_data)
    assert body["response_format"] == {"type": "json_object"}
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == streamed
    page.wait_for_selector('[data-role="assistant"]:nth-of-type(4)[data-state]:not('
                           '[data-state="streaming"])', timeout=60_000)

    assert not [m for m in console if "Content Security Policy" in m or "page error" in m]
    page.close()


MARKDOWN = """# Title
Some **bold**, *italic* and `<b>code</b>` text.
<img src=x onerror="document.title='pwned'"><script>document.title='pwned'</script>

- one
- two

1. first
2. second

```python
if a < b:
    print("<tag>")
```"""


def test_markdown_is_rendered_and_model_text_is_never_html(server, browser):
    page = browser.new_page()
    page.goto(server.base_url + "/")
    counts = page.evaluate("""(src) => {
        const box = document.createElement('div');
        box.innerHTML = window.renderMarkdown(src);
        document.body.append(box);
        const n = (sel) => box.querySelectorAll(sel).length;
        return {h1: n('h1'), strong: n('strong'), em: n('em'), code: n(':not(pre) > code'),
                ul: n('ul > li'), ol: n('ol > li'), pre: n('pre > code.language-python'),
                img: n('img'), script: n('script'), b: n('b'),
                text: box.textContent, code_text: box.querySelector('pre').textContent};
    }""", MARKDOWN)
    assert (counts["h1"], counts["strong"], counts["em"], counts["code"]) == (1, 1, 1, 1)
    assert (counts["ul"], counts["ol"], counts["pre"]) == (2, 2, 1)
    assert (counts["img"], counts["script"], counts["b"]) == (0, 0, 0)
    assert "<img src=x" in counts["text"] and "<b>code</b>" in counts["text"]
    assert counts["code_text"] == 'if a < b:\n    print("<tag>")'
    assert page.title() != "pwned"
    page.close()
