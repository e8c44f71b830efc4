"""Incremental detokenization with the real default tokenizer: never half a UTF-8 character, and
the pieces join to the full decode."""

from __future__ import annotations

import pytest

from soarllm.engine.detokenizer import IncrementalDetokenizer
from soarllm.sampling_params import SamplingParams

pytestmark = pytest.mark.model

TEXTS = [
    "Grüße aus Köln 🎉🚀 — naïve café, 日本語のテキスト, emoji 👩‍💻 and math ∑∫√",
    "def f(x):\n    return x ** 2  # 二乗\n\n\tprint('✓ done')",
    "  leading spaces, trailing spaces   ",
]


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from soarllm.model.loader import load_checkpoint
    from soarllm.model.tokenizer import load_tokenizer

    return load_tokenizer(load_checkpoint(str(default_model_path)))


@pytest.mark.parametrize("path", ["decode_stream", "two_decodes"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_never_splits_a_character(tokenizer, text, path, monkeypatch):
    """Both paths: tokenizers' DecodeStream (the default with a fast tokenizer) and the two
    windowed decodes through transformers."""
    if path == "two_decodes":
        monkeypatch.setattr("soarllm.engine.detokenizer._decode_stream", lambda *a: None)
    ids = tokenizer.encode(text, add_special_tokens=False)
    prompt = tokenizer.encode("Say:", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, prompt, SamplingParams())
    assert (detok.stream is not None) == (path == "decode_stream")
    pieces = []
    for t in ids:
        detok.add_token(t, check_stop=False)
        pieces.append(detok.take_delta(finished=False))
    detok.flush_pending()
    pieces.append(detok.take_delta(finished=True))
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    # multi-byte characters really were split over several tokens somewhere
    if text == TEXTS[0]:
        assert any(p == "" for p in pieces)


@pytest.mark.parametrize("stops", [[")", "("], ["(", ")"], [") +", "("], ["f(", "()"]])
def test_stop_cut_at_the_first_occurrence_whatever_the_list_order(tokenizer, stops):
    """One token can complete two stop strings at once: the text is cut before the one that
    occurs first in the text, so it holds none of them (the OpenAI contract)."""
    ids = tokenizer.encode("y = f() + 1", add_special_tokens=False)
    assert "()" in [tokenizer.decode([t]) for t in ids]  # one token holds both brackets
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stops))
    for t in ids:
        if detok.add_token(t, check_stop=True) is not None:
            break
    else:
        pytest.fail("no stop string found")
    text = tokenizer.decode(ids)
    assert detok.text == text[: min(text.index(s) for s in stops)]
    assert not any(s in detok.text for s in stops)
