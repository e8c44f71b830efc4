"""Data parallelism: the prefix router, and `soar serve -dp 2` answering like transformers with
prefix-sharing requests kept on one replica."""

from __future__ import annotations

import re

import httpx
import pytest
import torch

from soarllm.engine.data_parallel import PrefixRouter
from tests.serve.conftest import start_soar_serve


def test_router_prefers_the_replica_with_the_longest_prefix_then_the_least_loaded():
    r = PrefixRouter(2, block_size=4)
    system = list(range(100, 112))  # three whole blocks shared by the next prompts
    both = [True, True]
    assert r.route(system + [1, 2, 3, 4], [0, 0], both) == 0  # nothing known: least loaded
    assert r.route([7] * 16, [1, 0], both) == 1  # no shared prefix: least loaded
    # the shared prefix wins over load
    assert r.route(system + [9, 9, 9, 9], [5, 0], both) == 0
    assert r.stats.prefix_routed == 1 and r.stats.routed_blocks == 3
    # a prefix shorter than one block is no prefix at all
    assert r.route(system[:3], [5, 0], both) == 1
    # a replica that is not healthy gets nothing, its prefix notwithstanding
    assert r.route(system + [1, 2, 3, 4], [0, 9], [False, True]) == 1
    # replica 1 holds [7] * 16 (and now system + [1, 2, 3, 4]): a prompt extending it goes there
    assert r.route([7] * 20, [0, 9], both) == 1
    assert (r.stats.requests, r.stats.prefix_routed, r.stats.routed_blocks) == (6, 2, 7)


def _hf_greedy(model_dir, prompts: list[str], n: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok.encode(p)
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n)
            out.append(gen[0, len(ids):].tolist())
    return out


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}\{{([^}}]*)\}} (\S+)$", line)
        if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
            return float(m.group(2))
    raise AssertionError(f"{name}{{{want}}} not in /metrics")


@pytest.fixture(scope="module")
def dp2_server(tiny_gqa_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("dp-serve") / "server.log"
    srv = start_soar_serve(str(tiny_gqa_dir), "-dp", "2", "--kv-cache-memory", "32MiB",
                           "--served-model-name", "tiny", "--no-access-log", log_path=log)
    yield srv
    assert srv.stop() == 0, srv.log()[-3000:]


def test_dp2_serves_transformers_greedy_and_keeps_shared_prefixes_together(dp2_server,
                                                                          tiny_gqa_dir):
    import openai
    from transformers import AutoTokenizer

    client = openai.OpenAI(base_url=dp2_server.base_url + "/v1", api_key="none")
    tok = AutoTokenizer.from_pretrained(tiny_gqa_dir)
    shared = "import collections\nimport json\n\nclass Parser:\n    def __init__(self, args):\n"
    prompts = [shared + tail for tail in ("        self.", "        if ", "        return ")]
    n = 12
    expected = _hf_greedy(tiny_gqa_dir, prompts, n)
    for prompt, want in zip(prompts, expected):
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == tok.decode(want)
    metrics = httpx.get(dp2_server.base_url + "/metrics").text
    # the first went to the least loaded replica, the two after it to the same one (its prefix)
    assert _metric(metrics, "soar:router_requests_total") == 3
    assert _metric(metrics, "soar:router_prefix_routed_total") == 2
    hits = [_metric(metrics, "soar:replica_prefix_cache_hits", replica=str(i)) for i in (0, 1)]
    assert sorted(hits)[0] == 0 and sorted(hits)[1] > 0, hits
    assert _metric(metrics, "soar:prefix_cache_hits_total") == sum(hits)
    assert httpx.get(dp2_server.base_url + "/health").status_code == 200
