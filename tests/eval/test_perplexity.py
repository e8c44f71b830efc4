from __future__ import annotations

import math

import pytest
import torch

from soarllm.errors import InvalidRequestError
from soarllm.eval.perplexity import perplexity, sliding_windows


def test_windows_score_every_token_once():
    ws = sliding_windows(10, window=4, stride=2)
    assert [(w.begin, w.end, w.first_scored) for w in ws] == [
        (0, 4, 1), (2, 6, 4), (4, 8, 6), (6, 10, 8)]
    for n, window, stride in ((10, 4, 2), (100, 16, 5), (7, 8, 8), (33, 8, 8)):
        scored = [p for w in sliding_windows(n, window, stride) for p in range(w.first_scored, w.end)]
        assert scored == list(range(1, n))
    with pytest.raises(InvalidRequestError):
        sliding_windows(10, 4, 5)


class ContextBackend:
    """logprob of a token = -1 / (number of tokens of context it has in its window)."""

    name = "fake"

    def __init__(self):
        self.calls = 0

    def score(self, windows):
        self.calls += 1
        return [[None] + [-1.0 / p for p in range(1, len(w))] for w in windows]


def test_perplexity_uses_each_windows_context():
    backend = ContextBackend()
    result = perplexity(backend, list(range(10)), window=4, stride=2, batch=2)
    # Window 0 scores tokens 1..3 with 1..3 tokens of context; the later windows score their
    # last two tokens with 2 and 3 tokens of context.
    nll = (1 + 1 / 2 + 1 / 3) + 3 * (1 / 2 + 1 / 3)
    assert result.scored_tokens == 9 and result.num_windows == 4
    assert result.nll_per_token == pytest.approx(nll / 9)
    assert result.perplexity == pytest.approx(math.exp(nll / 9))
    assert backend.calls == 2


def test_local_perplexity_matches_transformers(tiny_model_dir):
    """The engine's prompt logprobs give the same perplexity as transformers on the same model."""
    from transformers import AutoModelForCausalLM

    from soarllm.eval.backends import LocalBackend

    backend = LocalBackend(str(tiny_model_dir), max_model_len=128, dtype="float32")
    tok = backend.tokenizer()
    import inspect
    import json as json_module

    ids = tok.encode(inspect.getsource(json_module.decoder), add_special_tokens=False)[:200]
    ours = perplexity(backend, ids, window=64, stride=32)

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    for w in sliding_windows(len(ids), 64, 32):
        x = torch.tensor([ids[w.begin : w.end]])
        with torch.no_grad():
            logp = torch.log_softmax(hf(x).logits[0].float(), -1)
        for pos in range(w.first_scored, w.end):
            nll -= logp[pos - w.begin - 1, ids[pos]].item()
            count += 1
    assert ours.scored_tokens == count
    assert ours.perplexity == pytest.approx(math.exp(nll / count), rel=1e-3)
