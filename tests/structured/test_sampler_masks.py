"""Grammar masks in the batched sampler, against numpy oracles: a disallowed token is never
drawn, greedy takes the best allowed token, sampling follows the model's distribution renormalised
over the allowed tokens (chi-square, with tests/sample's oracle) both on the vocabulary-wide path
and on the sparse path of rows that allow few tokens, logprobs stay those of the raw model
distribution, and rows without a mask are untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soarllm.model.input_batch import sampling_metadata_for
from soarllm.sample import sampler as sampler_module
from soarllm.sample.metadata import add_grammar_bitmask
from soarllm.sample.sampler import Sampler, unpack_bitmask, unpack_bitmask_torch
from soarllm.sampling_params import SamplingParams
from soarllm.scheduler_output import NewRequestData
from tests.sample.test_sampler import BASE, assert_follows, oracle


def pack(allowed: np.ndarray) -> np.ndarray:
    """bool [G, V] -> int32 [G, ceil(V / 32)], bit j of word w = token 32 * w + j (numpy's own
    little-endian bit packing, independent of the code under test)."""
    g, v = allowed.shape
    width = -(-v // 32)
    padded = np.zeros((g, width * 32), dtype=bool)
    padded[:, :v] = allowed
    return np.packbits(padded, axis=1, bitorder="little").view("<i4").reshape(g, width)


def run(logits: torch.Tensor, params: list[SamplingParams], masks: dict[int, np.ndarray]):
    """Sample one token per row; ``masks``: row -> bool [V] allowed tokens."""
    reqs = [NewRequestData(f"r{i}", [], 0, p, [], 0, eos_token_ids=(0,))
            for i, p in enumerate(params)]
    md = sampling_metadata_for(reqs, logits.shape[-1])
    rows = sorted(masks)
    if rows:
        bitmask = pack(np.stack([masks[r] for r in rows]))
        add_grammar_bitmask(md, [f"r{i}" for i in range(len(params))], np.ones(len(params), int),
                            [f"r{r}" for r in rows], bitmask)
    return Sampler()(logits.clone(), md)


def test_unpack_inverts_the_packing():
    rng = np.random.default_rng(0)
    for v in (1, 31, 32, 33, 77, 1000):
        allowed = rng.random((3, v)) < 0.3
        for unpack in (unpack_bitmask, unpack_bitmask_torch):  # CPU (numpy), accelerators
            got = unpack(torch.from_numpy(pack(allowed)), v).numpy()
            assert (got == allowed).all(), unpack.__name__


def test_greedy_takes_the_best_allowed_token_and_free_rows_are_untouched():
    rng = np.random.default_rng(1)
    v, b = 77, 12
    logits = torch.from_numpy(rng.normal(size=(b, v)).astype(np.float32))
    masks = {}
    for r in range(0, b, 2):  # every other row has a grammar that forbids its best token
        m = rng.random(v) < 0.2
        m[int(logits[r].argmax())] = False
        m[rng.integers(v)] = True
        masks[r] = m
    out = run(logits, [SamplingParams(temperature=0)] * b, masks)
    for r in range(b):
        x = logits[r].numpy()
        want = int(np.argmax(np.where(masks[r], x, -np.inf))) if r in masks else int(x.argmax())
        assert out.token_ids[r] == [want]


SPARSE = {"sparse": sampler_module.SPARSE_GRAMMAR_MAX, "vocabulary-wide": 0}


@pytest.mark.parametrize("path", list(SPARSE))
@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8),
                                    SamplingParams(temperature=1.3, top_k=3),
                                    SamplingParams(temperature=1.0, min_p=0.2)],
                         ids=["temperature", "top-k", "min-p"])
def test_sampling_follows_the_renormalised_allowed_distribution(params, path, monkeypatch):
    monkeypatch.setattr(sampler_module, "SPARSE_GRAMMAR_MAX", SPARSE[path])
    allowed = np.zeros(BASE.size, dtype=bool)
    allowed[[0, 3, 5, 8, 11, 14]] = True
    n = 6000
    logits = torch.from_numpy(np.tile(BASE.astype(np.float32), (n, 1)))
    torch.manual_seed(0)
    out = run(logits, [params] * n, {r: allowed for r in range(n)})
    draws = [t[0] for t in out.token_ids]
    # filters act on the masked distribution: the oracle sees the masked logits
    q = oracle(np.where(allowed, BASE, -np.inf), params)
    assert (q[~allowed] == 0).all()
    assert_follows(draws, q, min_expected=5.0)


@pytest.mark.parametrize("path", list(SPARSE))
def test_one_allowed_token_is_taken_at_any_temperature(path, monkeypatch):
    monkeypatch.setattr(sampler_module, "SPARSE_GRAMMAR_MAX", SPARSE[path])
    rng = np.random.default_rng(3)
    v, b = 77, 6
    logits = torch.from_numpy(rng.normal(size=(b, v)).astype(np.float32))
    masks = {}
    for r in range(b):
        masks[r] = np.zeros(v, dtype=bool)
        masks[r][int(logits[r].argmin())] = True  # the least likely token, forced
    params = [SamplingParams(temperature=t, seed=s) for t, s in
              ((0.7, None), (1.5, 4), (0, None), (1.0, None), (2.0, 9), (0.3, None))]
    out = run(logits, params, masks)
    assert [t[0] for t in out.token_ids] == [int(logits[r].argmin()) for r in range(b)]


def test_a_seeded_sparse_row_draws_the_same_token_in_any_batch():
    rng = np.random.default_rng(4)
    v = 300
    logits = torch.from_numpy(rng.normal(size=(1, v)).astype(np.float32))
    allowed = rng.random(v) < 0.2
    for seed in range(20):
        seeded = SamplingParams(temperature=1.0, seed=seed)
        alone = run(logits, [seeded], {0: allowed}).token_ids[0]
        others = torch.from_numpy(rng.normal(size=(4, v)).astype(np.float32))
        batch = torch.cat([others[:2], logits, others[2:]])
        params = [SamplingParams(temperature=0.9), SamplingParams(temperature=1.1, seed=7),
                  seeded, SamplingParams(temperature=1.2), SamplingParams(temperature=0.8)]
        mixed = run(batch, params, {2: allowed, 3: allowed})
        assert mixed.token_ids[2] == alone
        assert allowed[alone[0]]


def test_logprobs_are_the_raw_model_distribution():
    rng = np.random.default_rng(2)
    v = 50
    logits = torch.from_numpy(rng.normal(size=(2, v)).astype(np.float32))
    allowed = np.zeros(v, dtype=bool)
    allowed[[4, 9, 20]] = True
    params = SamplingParams(temperature=0, logprobs=3)
    out = run(logits, [params, params], {0: allowed})
    raw = torch.log_softmax(logits.double(), dim=-1).numpy()
    for r in range(2):
        tok = out.token_ids[r][0]
        lp = out.logprobs[r][0]
        assert lp[tok].logprob == pytest.approx(raw[r, tok], abs=1e-5)
        top3 = set(np.argsort(-raw[r])[:3].tolist())
        assert top3 <= set(lp)  # the raw top tokens, allowed or not
    assert allowed[out.token_ids[0][0]]


def test_each_request_masks_its_first_sampled_row_and_never_a_verification():
    md = sampling_metadata_for(
        [NewRequestData(f"r{i}", [1], 1, SamplingParams(), [], 0) for i in range(5)], 40)
    bitmask = pack(np.ones((2, 40), dtype=bool))
    add_grammar_bitmask(md, ["a", "b", "c"], np.array([1, 3, 1]), ["c", "a"], bitmask)
    assert md.grammar_rows.tolist() == [4, 0]
    with pytest.raises(RuntimeError, match="must not verify drafts"):
        add_grammar_bitmask(md, ["a", "b", "c"], np.array([1, 3, 1]), ["b"], bitmask[:1])
