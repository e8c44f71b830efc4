"""Stop strings, seeds and ``n`` over HTTP against a real `soar serve` (tiny random Llama), judged
by transformers running the same checkpoint: its greedy tokens (argmax of its own logits), its
tokenizer's decode, the stop cut computed here from that text, and, for sampling, a chi-square
test (scipy) of the server's first sampled tokens against transformers' softmax."""

from __future__ import annotations

import asyncio
import collections
import json

import httpx
import pytest
import torch

N_TOKENS = 40
PROMPT = "def parse(self, args):\n    "


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return tok, model


def hf_greedy_ids(model, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from transformers' logits, end-of-sequence included (as ignore_eos does)."""
    ids = list(ids)
    out = []
    with torch.inference_mode():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
    return out


@pytest.fixture(scope="module")
def greedy(hf):
    """(prompt ids, greedy ids, greedy text) for PROMPT, all from transformers."""
    tok, model = hf
    prompt_ids = tok(PROMPT)["input_ids"]
    ids = hf_greedy_ids(model, prompt_ids, N_TOKENS)
    return prompt_ids, ids, tok.decode(ids, skip_special_tokens=True)


def complete(server, **body) -> dict:
    r = httpx.post(server.base_url + "/v1/completions", timeout=120,
                   json={"model": "tiny", "prompt": PROMPT, "temperature": 0,
                         "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()


def stream_texts(server, **body) -> tuple[dict[int, str], dict[int, str]]:
    """Joined text and finish reason per choice index of a streamed completion."""
    texts: dict[int, str] = collections.defaultdict(str)
    finish: dict[int, str] = {}
    with httpx.stream("POST", server.base_url + "/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": PROMPT, "temperature": 0,
                            "ignore_eos": True, "stream": True, **body}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] += c["text"]
                    if c.get("finish_reason"):
                        finish[c["index"]] = c["finish_reason"]
    return dict(texts), finish


def tokens_until(tok, ids: list[int], stop: str) -> int:
    """How many tokens are generated before the decoded text first contains ``stop`` (text that
    ends inside a UTF-8 character is not final yet: the server never splits a character)."""
    for k in range(1, len(ids) + 1):
        text = tok.decode(ids[:k], skip_special_tokens=True)
        if stop in text and not text.endswith("\ufffd"):
            return k
    raise AssertionError(f"{stop!r} never appears")


# -- greedy ---------------------------------------------------------------------------------


def test_greedy_text_and_ids_equal_transformers(tiny_server, greedy):
    prompt_ids, _, text = greedy
    r = complete(tiny_server, max_tokens=N_TOKENS)
    assert r["choices"][0]["text"] == text
    assert r["choices"][0]["finish_reason"] == "length"
    usage = {k: r["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage == {"prompt_tokens": len(prompt_ids), "completion_tokens": N_TOKENS,
                     "total_tokens": len(prompt_ids) + N_TOKENS}
    # a prompt of token ids gives the same continuation as the text it encodes
    assert complete(tiny_server, prompt=prompt_ids, max_tokens=N_TOKENS)["choices"][0][
        "text"] == text


# -- stop strings ---------------------------------------------------------------------------


def _stops(text: str) -> list[str]:
    """Up to three stop strings of printable ASCII taken from the greedy text after its first
    quarter, each first found at a different place (some span several tokens)."""
    stops: list[str] = []
    for length, start in ((3, len(text) // 4), (2, len(text) // 3), (4, len(text) // 2)):
        for i in range(start, len(text) - length):
            s = text[i : i + length]
            if s.isascii() and s.isprintable() and s.strip() and s not in stops \
                    and text.index(s) not in [text.index(t) for t in stops]:
                stops.append(s)
                break
    return stops


def test_stop_string_cuts_the_greedy_text(tiny_server, hf, greedy):
    tok, _ = hf
    _, ids, text = greedy
    stops = _stops(text)
    assert stops
    for stop in stops:
        want = text[: text.index(stop)]
        r = complete(tiny_server, max_tokens=N_TOKENS, stop=[stop])
        choice = r["choices"][0]
        assert (choice["text"], choice["finish_reason"]) == (want, "stop"), stop
        # generation ends at the token that completes the stop string
        assert r["usage"]["completion_tokens"] == tokens_until(tok, ids, stop), stop
        kept = complete(tiny_server, max_tokens=N_TOKENS, stop=stop,
                        include_stop_str_in_output=True)["choices"][0]["text"]
        assert kept == text[: text.index(stop) + len(stop)]
        texts, finish = stream_texts(tiny_server, max_tokens=N_TOKENS, stop=[stop])
        assert texts == {0: want} and finish == {0: "stop"}, stop


def test_earliest_of_several_stops_wins_and_absent_stops_change_nothing(tiny_server, hf,
                                                                        greedy):
    tok, _ = hf
    _, ids, text = greedy
    stops = _stops(text)
    first = min(stops, key=lambda s: tokens_until(tok, ids, s))
    later = [s for s in stops if tokens_until(tok, ids, s) > tokens_until(tok, ids, first)]
    assert later
    r = complete(tiny_server, max_tokens=N_TOKENS, stop=[*later, first])  # listed last
    assert r["choices"][0]["text"] == text[: text.index(first)]
    absent = "\x07never\x07"
    assert absent not in text
    r = complete(tiny_server, max_tokens=N_TOKENS, stop=[absent])
    assert r["choices"][0]["text"] == text and r["choices"][0]["finish_reason"] == "length"


def test_no_stop_string_survives_when_one_token_completes_two(tiny_server, hf, greedy):
    """One token whose text holds two stop strings: the text is cut before the first of them,
    whatever their order in the request (the returned text contains no stop string)."""
    tok, _ = hf
    _, ids, text = greedy
    for k in range(1, len(ids)):
        before = tok.decode(ids[:k], skip_special_tokens=True)
        piece = tok.decode(ids[: k + 1], skip_special_tokens=True)[len(before):]
        chars = [c for c in piece if c.isascii() and c.isprintable() and c not in before]
        if len(set(chars)) >= 2 and "\ufffd" not in before + piece \
                and text.startswith(before + piece):
            a, b = chars[0], next(c for c in chars if c != chars[0])
            break
    else:
        pytest.fail("no greedy token holds two new printable characters")
    for stop in ([b, a], [a, b]):
        got = complete(tiny_server, max_tokens=N_TOKENS, stop=stop)["choices"][0]["text"]
        assert got == text[: text.index(a)], stop
        assert a not in got and b not in got


def test_stop_token_ids_end_generation_at_that_token(tiny_server, hf, greedy):
    tok, _ = hf
    _, ids, _ = greedy
    j = len(ids) // 2
    stop_id = ids[j]
    first = ids.index(stop_id)  # the first time the greedy run produces it
    r = complete(tiny_server, max_tokens=N_TOKENS, stop_token_ids=[stop_id])
    choice = r["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == first + 1
    before = tok.decode(ids[:first], skip_special_tokens=True)
    through = tok.decode(ids[: first + 1], skip_special_tokens=True)
    assert choice["text"] in (before, through)


def test_chat_stop_string(tiny_server, hf):
    tok, model = hf
    messages = [{"role": "user", "content": "import os"}]
    prompt_ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    ids = hf_greedy_ids(model, prompt_ids, N_TOKENS)
    text = tok.decode(ids, skip_special_tokens=True)
    stop = _stops(text)[0]
    r = httpx.post(tiny_server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": messages, "max_completion_tokens": N_TOKENS,
        "temperature": 0, "ignore_eos": True, "stop": stop}).json()
    assert r["choices"][0]["message"]["content"] == text[: text.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["prompt_tokens"] == len(prompt_ids)


# -- n --------------------------------------------------------------------------------------


def test_n_greedy_choices_all_equal_transformers(tiny_server, greedy):
    _, _, text = greedy
    r = complete(tiny_server, max_tokens=N_TOKENS, n=3)
    assert sorted(c["index"] for c in r["choices"]) == [0, 1, 2]
    assert [c["text"] for c in r["choices"]] == [text] * 3
    assert r["usage"]["completion_tokens"] == 3 * N_TOKENS
    stop = _stops(text)[0]
    texts, finish = stream_texts(tiny_server, max_tokens=N_TOKENS, n=3, stop=stop)
    assert texts == dict.fromkeys(range(3), text[: text.index(stop)])
    assert finish == dict.fromkeys(range(3), "stop")


def test_n_sampled_choices_differ_and_repeat_with_the_seed(tiny_server):
    kw = dict(max_tokens=12, temperature=1.0, n=4)
    a = complete(tiny_server, **kw, seed=7)
    b = complete(tiny_server, **kw, seed=7)
    texts = [c["text"] for c in sorted(a["choices"], key=lambda c: c["index"])]
    assert texts == [c["text"] for c in sorted(b["choices"], key=lambda c: c["index"])]
    assert len(set(texts)) == 4  # 12 tokens from a flat distribution: never all alike
    assert a["usage"]["completion_tokens"] == 48
    streamed, _ = stream_texts(tiny_server, **kw, seed=7)
    assert [streamed[i] for i in range(4)] == texts


# -- seeds ----------------------------------------------------------------------------------


def test_seed_reproducible_alone_and_in_a_busy_batch(tiny_server):
    kw = dict(max_tokens=16, temperature=1.0, top_p=0.95)
    alone = complete(tiny_server, **kw, seed=42)["choices"][0]["text"]
    assert complete(tiny_server, **kw, seed=43)["choices"][0]["text"] != alone

    async def busy():
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120) as http:
            def body(i):
                return {"model": "tiny", "prompt": PROMPT if i == 8 else f"x = {i}\n",
                        "ignore_eos": True, **kw, "seed": 42 if i == 8 else 1000 + i}
            rs = await asyncio.gather(*(http.post("/v1/completions", json=body(i))
                                        for i in range(16)))
        return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(busy())[8] == alone


def test_seeded_first_tokens_follow_transformers_softmax(tiny_server, hf):
    """600 seeds, one token each at temperature 0.5: the counts of each first token fit
    transformers' softmax(logits / 0.5) (chi-square, scipy). A sampler that ignored the
    temperature or the seed, or sampled from the wrong row, fails."""
    from scipy.stats import chisquare

    tok, model = hf
    temperature, num = 0.5, 600
    prompt_ids = tok(PROMPT)["input_ids"]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt_ids])).logits[0, -1].double()
    probs = torch.softmax(logits / temperature, -1)
    by_text: dict[str, float] = collections.defaultdict(float)
    for tid, p in enumerate(probs.tolist()):
        by_text[tok.decode([tid], skip_special_tokens=True)] += p

    async def sample():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=tiny_server.base_url, timeout=120,
                                     limits=limits) as http:
            sem = asyncio.Semaphore(64)

            async def one(seed):
                async with sem:
                    r = await http.post("/v1/completions", json={
                        "model": "tiny", "prompt": prompt_ids, "max_tokens": 1,
                        "temperature": temperature, "seed": seed, "ignore_eos": True})
                    return r.json()["choices"][0]["text"]

            return await asyncio.gather(*(one(s) for s in range(num)))

    counts = collections.Counter(asyncio.run(sample()))
    assert set(counts) <= set(by_text), set(counts) - set(by_text)
    # bins: every text expected at least 5 times, the rest pooled
    big = sorted(t for t, p in by_text.items() if p * num >= 5)
    assert len(big) >= 4
    observed = [counts[t] for t in big] + [num - sum(counts[t] for t in big)]
    expected = [by_text[t] * num for t in big]
    expected.append(num - sum(expected))
    assert chisquare(observed, expected).pvalue > 1e-3, list(zip(big, observed, expected))
    # at temperature 1 the distribution is flatter: the same samples would not fit it
    flat = torch.softmax(logits, -1)
    flat_by_text: dict[str, float] = collections.defaultdict(float)
    for tid, p in enumerate(flat.tolist()):
        flat_by_text[tok.decode([tid], skip_special_tokens=True)] += p
    flat_expected = [flat_by_text[t] * num for t in big]
    flat_expected.append(num - sum(flat_expected))
    assert chisquare(observed, flat_expected).pvalue < 1e-3
