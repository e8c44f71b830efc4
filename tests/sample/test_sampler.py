"""Sampler distribution tests against an independent numpy oracle.

For each filter (top-k, top-p, min-p), their combinations, temperature and the penalties
(repetition, presence, frequency), many tokens are drawn with a fixed seed and compared with the
renormalised truncated distribution computed here in numpy (float64):

(a) no token outside the allowed set is drawn, and every allowed token is drawn at least once;
(b) a chi-square goodness-of-fit test (scipy.stats.chisquare) does not reject (p > 1e-3).

The oracle follows the semantics documented in soarllm/sample/sampler.py (and vLLM / OpenAI):
penalties act on the raw logits (repetition on prompt + output tokens, divide positive logits and
multiply negative ones; presence / frequency on output tokens only), then the logits are divided
by the temperature, and a token is kept when every one of top-k, top-p (smallest prefix of the
sorted distribution whose mass reaches top_p) and min-p (p >= min_p * max p) allows it, each
computed on the temperature-scaled distribution.

logit_bias is not tested: SamplingParams has no logit_bias (the HTTP layer refuses it).

Every sampler call goes through ``sample`` below, so a change of the sampler's call signature
(e.g. a tensor ``SamplingMetadata``) only needs that one function updated.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from soarllm.model.input_batch import sampling_metadata_for
from soarllm.sample.sampler import Sampler
from soarllm.sampling_params import SamplingParams
from soarllm.scheduler_output import NewRequestData

EOS = 0
P_MIN = 1e-3  # chi-square: reject below this p-value


# --------------------------------------------------------------------------------------------
# The one adapter between these tests and the sampler.
# --------------------------------------------------------------------------------------------
def sample(
    logits: torch.Tensor,
    params_list: list[SamplingParams],
    output_token_ids_list: list[list[int]] | None = None,
    prompt_token_ids_list: list[list[int]] | None = None,
    with_logprobs: bool = False,
):
    """Sample one token per row of ``logits`` [B, V]; row i uses ``params_list[i]``, has produced
    ``output_token_ids_list[i]`` so far (default none) after the prompt
    ``prompt_token_ids_list[i]`` (default empty). EOS is token 0. Returns the token ids, plus the
    per-row logprobs when ``with_logprobs``."""
    n = len(params_list)
    assert logits.shape[0] == n
    reqs = []
    for i, params in enumerate(params_list):
        prompt = list(prompt_token_ids_list[i]) if prompt_token_ids_list else []
        output = list(output_token_ids_list[i]) if output_token_ids_list else []
        reqs.append(NewRequestData(f"r{i}", prompt + output, len(prompt), params, [], 0,
                                   eos_token_ids=(EOS,)))
    md = sampling_metadata_for(reqs, logits.shape[-1])
    out = Sampler()(logits.clone(), md)
    assert all(len(toks) == 1 for toks in out.token_ids)  # one token per row for a plain decode
    token_ids = [toks[0] for toks in out.token_ids]
    if not with_logprobs:
        return token_ids
    return token_ids, [lp[0] if lp is not None else None for lp in out.logprobs]


# --------------------------------------------------------------------------------------------
# Oracle (numpy, float64)
# --------------------------------------------------------------------------------------------
def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def penalised_logits(logits: np.ndarray, params: SamplingParams, prompt=(), output=()) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64).copy()
    if params.repetition_penalty != 1.0:
        seen = np.array(sorted(set(prompt) | set(output)), dtype=np.int64)
        if seen.size:
            v = x[seen]
            x[seen] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if len(output):
        counts = np.bincount(np.asarray(output), minlength=x.size)[: x.size].astype(np.float64)
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return x


def oracle(logits: np.ndarray, params: SamplingParams, prompt=(), output=()) -> np.ndarray:
    """The distribution the next token must follow. Asserts that no filter decision lies within
    float noise of its threshold (so float32 in the sampler cannot flip it)."""
    x = penalised_logits(logits, params, prompt, output)
    if params.temperature == 0:
        q = np.zeros_like(x)
        q[np.argmax(x)] = 1.0
        return q
    p = _softmax(x / params.temperature)
    keep = np.ones(p.size, dtype=bool)
    order = np.argsort(-p, kind="stable")
    sp = p[order]
    if 0 < params.top_k < p.size:
        assert sp[params.top_k - 1] - sp[params.top_k] > 1e-4, "test design: top-k tie"
        keep[order[params.top_k:]] = False
    if params.top_p < 1.0:
        before = np.cumsum(sp) - sp
        assert np.abs(before - params.top_p).min() > 1e-4, "test design: top-p on a boundary"
        keep[order[before >= params.top_p]] = False
    if params.min_p > 0:
        thr = params.min_p * p.max()
        assert np.abs(p - thr).min() > 1e-4 * p.max(), "test design: min-p on a boundary"
        keep &= p >= thr
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def assert_follows(draws: list[int], q: np.ndarray, min_expected: float = 10.0) -> None:
    """(a) only allowed tokens, each at least once; (b) chi-square does not reject."""
    n = len(draws)
    counts = np.bincount(np.asarray(draws), minlength=q.size)
    allowed = q > 0
    expected = q * n
    assert expected[allowed].min() >= min_expected, "test design: an allowed token is too rare"
    outside = {int(t): int(counts[t]) for t in np.nonzero(~allowed & (counts > 0))[0]}
    assert not outside, f"drew tokens outside the allowed set {sorted(np.nonzero(allowed)[0])}: {outside}"
    missing = sorted(int(t) for t in np.nonzero(allowed & (counts == 0))[0])
    assert not missing, f"allowed tokens never drawn in {n} draws: {missing}"
    if allowed.sum() < 2:
        return
    # cells with an expected count under 5 are pooled (the chi-square approximation needs it)
    big = allowed & (expected >= 5)
    small = allowed & ~big
    f_obs, f_exp = list(counts[big]), list(expected[big])
    if small.any():
        f_obs.append(counts[small].sum())
        f_exp.append(expected[small].sum())
    if len(f_obs) < 2:
        return
    p_value = chisquare(np.array(f_obs, dtype=float), np.array(f_exp)).pvalue
    assert p_value > P_MIN, (
        f"chi-square rejects the oracle distribution (p={p_value:.2e}); "
        f"observed {counts.tolist()}, expected {np.round(expected, 1).tolist()}"
    )


# --------------------------------------------------------------------------------------------
# A designed vocabulary: distinct probabilities, no filter threshold near a decision, token ids
# permuted (so sorted order != id order), logits shifted so that some are positive and some
# negative (the repetition penalty treats the two signs differently).
# --------------------------------------------------------------------------------------------
_WEIGHTS = np.array([30, 22, 16, 12, 9, 7, 5.5, 4.2, 3.3, 2.6, 2.0, 1.6, 1.3, 1.0, 0.8, 0.6])
V = _WEIGHTS.size
_PERM = np.random.default_rng(7).permutation(V)
BASE = np.empty(V)
BASE[_PERM] = np.log(_WEIGHTS / _WEIGHTS.sum()) + 3.0
assert (BASE > 0).any() and (BASE < 0).any()


def rank(i: int) -> int:
    """Token id of the i-th most likely token of BASE."""
    return int(_PERM[i])


@dataclass
class Case:
    params: dict
    prompt: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    n: int = 6000


CASES = {
    # single filters
    "top_k=5": Case(dict(top_k=5)),
    "top_k=2": Case(dict(top_k=2)),
    "top_p=0.7": Case(dict(top_p=0.7)),
    "top_p=0.45": Case(dict(top_p=0.45)),
    "min_p=0.25": Case(dict(min_p=0.25)),
    "min_p=0.05": Case(dict(min_p=0.05)),
    # temperature alone and with each filter
    "T=1.8": Case(dict(temperature=1.8)),
    "T=0.6,top_k=6": Case(dict(temperature=0.6, top_k=6)),
    "T=1.5,top_p=0.8": Case(dict(temperature=1.5, top_p=0.8)),
    "T=0.7,min_p=0.1": Case(dict(temperature=0.7, min_p=0.1)),
    # combinations (each with a different filter binding)
    "top_k=4,top_p=0.9": Case(dict(top_k=4, top_p=0.9)),
    "top_k=10,top_p=0.6": Case(dict(top_k=10, top_p=0.6)),
    "top_p=0.9,min_p=0.2": Case(dict(top_p=0.9, min_p=0.2)),
    "T=1.3,top_k=9,top_p=0.85,min_p=0.1": Case(dict(temperature=1.3, top_k=9, top_p=0.85, min_p=0.1)),
    # penalties: the prompt / output hold tokens with positive and with negative logits
    "repetition=1.4": Case(
        dict(repetition_penalty=1.4), prompt=[rank(0), rank(3), rank(9)], output=[rank(1), rank(12)]
    ),
    "repetition=0.7": Case(dict(repetition_penalty=0.7), prompt=[rank(2), rank(11)], output=[rank(6)]),
    "presence=0.8": Case(dict(presence_penalty=0.8), prompt=[rank(1)], output=[rank(0), rank(4), rank(4)]),
    "presence=-0.6": Case(dict(presence_penalty=-0.6), output=[rank(8), rank(10)]),
    "frequency=0.5": Case(dict(frequency_penalty=0.5), output=[rank(0), rank(0), rank(0), rank(2)]),
    "presence+frequency": Case(
        dict(presence_penalty=0.4, frequency_penalty=0.3), output=[rank(0), rank(0), rank(1), rank(5)]
    ),
    "all penalties,T=0.8,top_k=7,top_p=0.9": Case(
        dict(temperature=0.8, top_k=7, top_p=0.9, repetition_penalty=1.2, presence_penalty=0.3,
             frequency_penalty=0.2),
        prompt=[rank(0), rank(7)],
        output=[rank(1), rank(1), rank(3)],
    ),
}


def _draw_case(case: Case, seed: int = 0) -> tuple[list[int], np.ndarray]:
    params = SamplingParams(**case.params)
    q = oracle(BASE, params, case.prompt, case.output)
    logits = torch.tensor(BASE, dtype=torch.float32)[None, :].expand(case.n, -1)
    torch.manual_seed(seed)
    draws = sample(logits, [params] * case.n, [case.output] * case.n, [case.prompt] * case.n)
    return draws, q


@pytest.mark.parametrize("name", list(CASES))
def test_distribution_matches_oracle(name):
    draws, q = _draw_case(CASES[name], seed=list(CASES).index(name))
    assert_follows(draws, q)


def test_filters_really_truncate():
    """The cases exercise what they claim: each filter removes tokens, and in each combination a
    different filter is the binding one."""
    def allowed(**kw):
        return int((oracle(BASE, SamplingParams(**kw)) > 0).sum())

    assert allowed(top_k=5) == 5 and allowed(top_p=0.7) == 5 and allowed(min_p=0.25) == 5
    assert allowed(top_p=0.45) == 3 and 2 < allowed(min_p=0.05) < V
    assert allowed(top_k=4, top_p=0.9) == 4 < allowed(top_p=0.9)
    assert allowed(top_k=10, top_p=0.6) == allowed(top_p=0.6) < 10
    assert allowed(top_p=0.9, min_p=0.2) == allowed(min_p=0.2) < allowed(top_p=0.9)


def test_oracle_rejects_a_wrong_distribution():
    """The statistical check has power: top-k draws do not pass as top-(k+1), T=1.8 draws do not
    pass as T=1, and penalised draws do not pass as unpenalised."""
    for name, wrong in (
        ("top_k=5", dict(top_k=6)),
        ("top_p=0.7", dict(top_p=0.7 * 0.9)),
        ("T=1.8", dict()),
        ("presence=0.8", dict()),
    ):
        draws, _ = _draw_case(CASES[name])
        with pytest.raises(AssertionError):
            assert_follows(draws, oracle(BASE, SamplingParams(**wrong)), min_expected=0)


def test_seeded_draws_follow_the_distribution():
    """Rows with distinct seeds, and one seed over successive output positions, both sample the
    oracle distribution (a seed that ignored the position would repeat one token)."""
    params = [SamplingParams(temperature=1.2, top_p=0.9, seed=s) for s in range(3000)]
    logits = torch.tensor(BASE, dtype=torch.float32)[None, :].expand(len(params), -1)
    q = oracle(BASE, params[0])
    assert_follows(sample(logits, params), q)

    one = SamplingParams(temperature=1.2, top_p=0.9, seed=1234)
    n = 3000
    history = [[rank(15)] * i for i in range(n)]  # positions 0..n-1; no penalties, so no effect
    assert_follows(sample(logits[:n], [one] * n, history), q)


def test_seeded_draws_reproduce_and_different_seeds_differ():
    n = 400
    logits = torch.tensor(BASE, dtype=torch.float32)[None, :].expand(n, -1)

    def draws(seed0):
        return sample(logits, [SamplingParams(temperature=1.0, seed=seed0 + i) for i in range(n)])

    torch.manual_seed(0)  # the global RNG moves on between the calls: seeded rows must not care
    a, again, b = draws(0), draws(0), draws(10_000)
    assert a == again
    same = np.mean(np.array(a) == np.array(b))
    # independent draws agree with probability sum(q^2) (~0.11 here)
    q2 = float((oracle(BASE, SamplingParams()) ** 2).sum())
    assert same < q2 + 0.1, f"different seeds agree on {same:.0%} of rows"


def test_unseeded_draws_differ_between_calls():
    n = 400
    logits = torch.tensor(BASE, dtype=torch.float32)[None, :].expand(n, -1)
    a = sample(logits, [SamplingParams()] * n)
    b = sample(logits, [SamplingParams()] * n)
    assert a != b


def test_seeded_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 2
    alone = sample(logits[1:2], [SamplingParams(seed=123)])
    mixed = sample(logits, [SamplingParams(), SamplingParams(seed=123), SamplingParams(),
                            SamplingParams(seed=5)])
    assert mixed[1] == alone[0]


def test_greedy_is_argmax():
    """temperature 0 takes the argmax of the (penalised) logits; filters do not change it."""
    g = torch.Generator().manual_seed(1)
    n = 64
    logits = torch.randn(n, 40, generator=g) * 3
    prompts = [torch.randint(0, 40, (5,), generator=g).tolist() for _ in range(n)]
    outputs = [torch.randint(0, 40, (4,), generator=g).tolist() for _ in range(n)]
    variants = [
        dict(),
        dict(top_k=3, top_p=0.5, min_p=0.3),
        dict(repetition_penalty=1.5),
        dict(presence_penalty=1.0, frequency_penalty=0.7),
    ]
    for kw in variants:
        params = [SamplingParams(temperature=0.0, **kw) for _ in range(n)]
        got = sample(logits, params, outputs, prompts)
        want = [
            int(np.argmax(oracle(logits[i].numpy(), params[i], prompts[i], outputs[i])))
            for i in range(n)
        ]
        assert got == want, kw
    # the penalties did change some argmaxes, so the comparison above could fail
    plain = logits.argmax(-1).tolist()
    penalised = sample(logits, [SamplingParams(temperature=0.0, repetition_penalty=1.5)] * n,
                       outputs, prompts)
    assert plain != penalised


def test_min_tokens_bans_eos():
    logits = torch.zeros(1, 50)
    logits[0, EOS] = 10.0  # EOS is the most likely token
    logits[0, 7] = 5.0
    assert sample(logits, [SamplingParams(temperature=0.0)]) == [EOS]
    assert sample(logits, [SamplingParams(temperature=0.0, min_tokens=2)]) == [7]
    assert sample(logits, [SamplingParams(temperature=0.0, min_tokens=2)], [[3, 4]]) == [EOS]


def test_logprobs_report_rank_and_top_n():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 50, generator=g) * 2
    _, lps = sample(logits, [SamplingParams(temperature=0.0, logprobs=3)], with_logprobs=True)
    lp = lps[0]
    ref = torch.log_softmax(logits[0].double(), -1)
    top3 = torch.topk(ref, 3).indices.tolist()
    assert list(lp) == top3
    assert lp[top3[0]].rank == 1
    assert lp[top3[0]].logprob == pytest.approx(ref[top3[0]].item(), abs=1e-5)


def test_seeds_beyond_int64_are_taken_modulo_2_63():
    """The seed stream is defined modulo 2**63: a Python-int seed of any size samples, and equals
    the reduced seed's draws."""
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    big = [SamplingParams(temperature=1.0, seed=2**64 + 5 + i) for i in range(64)]
    small = [SamplingParams(temperature=1.0, seed=5 + i) for i in range(64)]
    assert sample(logits, big) == sample(logits, small)
