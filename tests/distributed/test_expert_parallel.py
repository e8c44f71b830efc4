"""Mixture-of-Experts models over two tensor-parallel ranks (gloo on CPU), the experts split by
width (default) or whole (expert parallel): greedy tokens and their log-probabilities equal
transformers' on the same weights, batched and with chunked prefill; each rank holds half of the
experts' bytes; the tokens routed per expert (engine stats and /metrics) equal the counts of
transformers' own router; splits the model cannot take are refused before any worker starts."""

from __future__ import annotations

import random

import pytest
import torch

from soarllm import LLM, SamplingParams
from soarllm.config import EngineArgs
from soarllm.errors import ConfigError
from tests.tiny import make_tiny_model

N_TOKENS = 10
# Mixtral: 4 experts, top 2, renormalised. Qwen2-MoE: a dense first layer, then 4 experts
# (top 2, not renormalised) beside a shared expert behind its sigmoid gate, q/k/v biases.
FAMILIES = {"mixtral": {}, "qwen2_moe": {"mlp_only_layers": [0]}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe_dir(request, tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp(f"ep-{request.param}"), request.param,
                        **FAMILIES[request.param])
    if request.param == "qwen2_moe":
        from tests.distributed.conftest import randomize_biases

        randomize_biases(d)
    return d


@pytest.fixture(scope="module")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(3, 500) for _ in range(rng.randint(5, 40))] for _ in range(4)]


@pytest.fixture(scope="module")
def hf_reference(moe_dir, prompts):
    """transformers' greedy tokens, their log-probabilities, the expert bytes of the whole model
    and, per MoE layer, the tokens its router sends to each expert (every token the engine
    computes: the prompt and each generated token but the last)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(moe_dir), dtype=torch.float32).eval()
    cfg = model.config
    num_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    tokens, logprobs, load = [], [], None
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), do_sample=False, max_new_tokens=N_TOKENS,
                                 min_new_tokens=N_TOKENS)
            new = gen[0, len(ids):]
            out = model(gen[:, :-1], output_router_logits=True)
            lp = torch.log_softmax(out.logits[0, len(ids) - 1 :].double(), dim=-1)
            tokens.append(new.tolist())
            logprobs.append(lp.gather(1, new[:, None])[:, 0])
            counts = torch.stack([
                torch.bincount(r.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten(),
                               minlength=num_experts)
                for r in out.router_logits])
            load = counts if load is None else load + counts
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if ".experts." in n)
    return tokens, logprobs, load.tolist(), expert_bytes


@pytest.fixture(scope="module", params=[False, True, "all_to_all"],
                ids=["by-width", "expert-parallel", "expert-parallel-all-to-all"])
def tp2(request, moe_dir):
    """Two ranks, a small token budget: prompts are prefilled in chunks beside other requests'
    decodes (an odd token count splits unevenly over the ranks under all-to-all dispatch)."""
    dispatch = request.param if isinstance(request.param, str) else "all_reduce"
    llm = LLM(str(moe_dir), dtype="float32", kv_cache_memory="32MiB", tensor_parallel_size=2,
              enable_expert_parallel=bool(request.param), expert_dispatch=dispatch,
              block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)
    yield llm
    llm.llm_engine.shutdown()


def test_greedy_equals_transformers(tp2, prompts, hf_reference):
    ref_tokens, ref_logprobs, _, _ = hf_reference
    sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True, logprobs=1)
    outs = [o.outputs[0] for o in tp2.generate(prompts, sp)]
    assert [o.token_ids for o in outs] == ref_tokens
    for o, ref in zip(outs, ref_logprobs):
        ours = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)],
                            dtype=torch.float64)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    # load balance: every rank routed the whole batch, as transformers' router does
    per_rank = tp2.llm_engine.executor.collective_rpc("expert_load")
    assert per_rank[0] == per_rank[1] == hf_reference[2]
    stats = tp2.llm_engine.get_stats()
    assert stats.expert_load == hf_reference[2]
    from prometheus_client.parser import text_string_to_metric_families

    from soarllm.serve.metrics import ServerMetrics

    text = ServerMetrics("m", lambda: stats).render().decode()
    routed = {s.labels["expert"]: s.value for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "soar:moe_expert_routed_tokens_total"}
    assert routed == {str(e): sum(col) for e, col in enumerate(zip(*hf_reference[2]))}


def test_each_rank_holds_half_the_experts(tp2, hf_reference):
    per_rank = tp2.llm_engine.executor.collective_rpc("parameter_bytes", ".experts.")
    assert per_rank == [hf_reference[3] // 2] * 2


def _args(model_dir, **kw) -> EngineArgs:
    return EngineArgs(model=str(model_dir), dtype="float32", **kw)


def test_bad_splits_are_refused_before_workers_start(tmp_path):
    from soarllm.distributed.multiproc import MultiprocExecutor

    odd = make_tiny_model(tmp_path / "odd", "mixtral", num_local_experts=3,
                          intermediate_size=125)
    with pytest.raises(ConfigError, match=r"splits the 3 experts over tensor_parallel_size=2 "
                       r"ranks.*choose a tensor_parallel_size that divides 3"):
        MultiprocExecutor(_args(odd, tensor_parallel_size=2, enable_expert_parallel=True))
    with pytest.raises(ConfigError, match=r"does not divide the experts' intermediate size "
                       r"\(125\); choose a tensor_parallel_size that divides 125"):
        MultiprocExecutor(_args(odd, tensor_parallel_size=2))
    dense = make_tiny_model(tmp_path / "dense", "llama")
    with pytest.raises(ConfigError, match="has none; drop --enable-expert-parallel"):
        MultiprocExecutor(_args(dense, tensor_parallel_size=2, enable_expert_parallel=True))
    with pytest.raises(ConfigError, match="has none; drop --enable-expert-parallel"):
        LLM(str(dense), dtype="float32", enable_expert_parallel=True)
    with pytest.raises(ConfigError, match="all_to_all' sends tokens .* needs "
                       "enable_expert_parallel"):
        LLM(str(odd), dtype="float32", expert_dispatch="all_to_all")


@pytest.mark.parametrize("quantization", ["w8a16", "w4a16"])
def test_quantized_model_splits_like_one_rank(tmp_path, prompts, quantization):
    """Weights quantized at load (int8 rows / int4 groups of 32) over two ranks, experts by width
    and whole: each rank computes with exactly its slice of what one rank computes with (an int8
    row's scale is its maximum over the whole row, on every rank), holds about half of the
    quantized experts' bytes, and scores one rank's greedy continuations alike (the quantized kernels
    compute in bfloat16: each rank rounds its partial sums, hence the tolerance)."""
    from soarllm.distributed.worker import dequantized_weight

    d = make_tiny_model(tmp_path / "mixtral", "mixtral")
    common = dict(dtype="float32", kv_cache_memory="32MiB", block_size=4,
                  enable_prefix_caching=False, quantization=quantization,
                  max_num_batched_tokens=16)  # the same chunks on one rank and on two
    one = LLM(str(d), **common)
    model = one.llm_engine.executor.runner.model
    sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)
    seqs = [p + o.outputs[0].token_ids for p, o in zip(prompts, one.generate(prompts, sp))]
    score = SamplingParams(max_tokens=1, prompt_logprobs=0)

    def scored(llm):
        return [torch.tensor([next(iter(lp.values())).logprob for lp in o.prompt_logprobs[1:]])
                for o in llm.generate(seqs, score)]

    ref_scores = scored(one)
    o_proj, experts = "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.experts"
    ref_o, ref_experts = dequantized_weight(model.get_submodule(o_proj)), dequantized_weight(
        model.get_submodule(experts))
    ref_bytes = sum(b.numel() * b.element_size() for n, b in model.state_dict().items()
                    if ".experts." in n)
    del one, model
    for ep in (False, True):
        llm = LLM(str(d), **common, tensor_parallel_size=2, enable_expert_parallel=ep)
        try:
            for r, w in enumerate(llm.llm_engine.executor.collective_rpc("dequantized_weight",
                                                                         o_proj)):
                half = ref_o.shape[1] // 2  # row parallel: this rank's input columns
                torch.testing.assert_close(w, ref_o[:, r * half:(r + 1) * half], atol=0, rtol=0)
            for r, stacks in enumerate(llm.llm_engine.executor.collective_rpc(
                    "dequantized_weight", experts)):
                gate_up, down = ref_experts["gate_up_proj"], ref_experts["down_proj"]
                e, width = gate_up.shape[0] // 2, down.shape[-1]
                i = width // 2
                if ep:  # whole experts
                    want = gate_up[r * e:(r + 1) * e], down[r * e:(r + 1) * e]
                else:  # this rank's gate rows, then its up rows; down's columns
                    want = (torch.cat([gate_up[:, r * i:(r + 1) * i],
                                       gate_up[:, width + r * i:width + (r + 1) * i]], dim=1),
                            down[..., r * i:(r + 1) * i])
                torch.testing.assert_close(stacks["gate_up_proj"], want[0], atol=0, rtol=0)
                torch.testing.assert_close(stacks["down_proj"], want[1], atol=0, rtol=0)
            for ours, ref in zip(scored(llm), ref_scores):
                torch.testing.assert_close(ours, ref, atol=2e-2, rtol=0)
            # half of every stack; by width, the down projection's per-row int8 scales (one
            # float per output row) are the only thing both ranks hold whole
            per_rank = llm.llm_engine.executor.collective_rpc("parameter_bytes", ".experts.")
            assert per_rank[0] == per_rank[1] <= 0.51 * ref_bytes
        finally:
            llm.llm_engine.shutdown()


def test_gguf_int4_experts_split_on_their_blocks(tmp_path):
    """A GGUF file's Q4_0 expert stacks over two ranks, by width (each rank's 32 columns of the
    down projection are whole blocks) and whole: every rank repacks its slice of the file's
    blocks, exactly its slice of what one rank computes with, still 4-bit."""
    from soarllm.distributed.worker import dequantized_weight
    from soarllm.model.layers.fused_moe import FusedMoE
    from tests.model.test_moe_gguf import FAMILIES as GGUF_FAMILIES
    from tests.model.test_moe_gguf import write_moe_gguf

    hf_dir = make_tiny_model(tmp_path / "hf", "qwen2_moe", **GGUF_FAMILIES["qwen2_moe"])
    path = write_moe_gguf(hf_dir, tmp_path / "qwen2moe-Q4_0.gguf", "Q4_0")
    common = dict(dtype="float32", kv_cache_memory="32MiB", block_size=4)
    one = LLM(str(path), **common)
    model = one.llm_engine.executor.runner.model
    names = [n for n, m in model.named_modules() if isinstance(m, FusedMoE)]
    ref = {n: dequantized_weight(model.get_submodule(n)) for n in names}
    ref_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if ".experts." in n)
    assert all(model.get_submodule(n).gate_up_proj.dtype == torch.uint8 for n in names)
    del one, model
    for ep in (False, True):
        llm = LLM(str(path), **common, tensor_parallel_size=2, enable_expert_parallel=ep)
        try:
            per_rank = llm.llm_engine.executor.collective_rpc("parameter_bytes", ".experts.")
            assert per_rank == [ref_bytes // 2] * 2  # packed 4-bit, half the stacks each
            for n in names:
                gate_up, down = ref[n]["gate_up_proj"], ref[n]["down_proj"]
                e, width = gate_up.shape[0] // 2, down.shape[-1]
                i = width // 2
                for r, stacks in enumerate(llm.llm_engine.executor.collective_rpc(
                        "dequantized_weight", n)):
                    if ep:
                        want = gate_up[r * e:(r + 1) * e], down[r * e:(r + 1) * e]
                    else:
                        want = (torch.cat([gate_up[:, r * i:(r + 1) * i],
                                           gate_up[:, width + r * i:width + (r + 1) * i]], 1),
                                down[..., r * i:(r + 1) * i])
                    torch.testing.assert_close(stacks["gate_up_proj"], want[0], atol=0, rtol=0)
                    torch.testing.assert_close(stacks["down_proj"], want[1], atol=0, rtol=0)
        finally:
            llm.llm_engine.shutdown()


@pytest.mark.parametrize("flags", [["--scheme", "w8a16", "--method", "gptq"],
                                   ["--scheme", "w4a16", "--method", "gptq", "--group-size", "32"],
                                   ["--scheme", "w8a16", "--method", "rtn", "--sparsity", "2:4"],
                                   ["--scheme", "w4a16", "--method", "gptq", "--group-size", "32",
                                    "--sparsity", "2:4"],
                                   ["--scheme", "w4a16", "--method", "rtn", "--group-size", "32",
                                    "--sparsity", "2:4", "densify"]],
                         ids=["w8a16-gptq", "w4a16-gptq", "w8a16-2:4", "w4a16-gptq-2:4",
                              "w4a16-2:4-densify"])
def test_a_compressed_tensors_checkpoint_splits_on_its_stored_integers(tmp_path, flags):
    """A `soar quantize` checkpoint (GPTQ: its integers need not reach the ends of the range, so
    rounding a slice again would not give them back) over two ranks: each rank loads its slice
    of the stored integers and scales (an int8 row keeps its row's scale), exactly its slice of
    what one rank computes with. 2:4 layers stay compressed on every rank (kept integers and
    mask cut on whole mask bytes), and the ranks score what one rank scores."""
    from soarllm.cli.main import main as soar
    from soarllm.distributed.worker import dequantized_weight

    d = make_tiny_model(tmp_path / "llama", "llama")
    out = tmp_path / "packed"
    densify = flags[-1] == "densify"  # 2:4 layers on the dense int kernels
    flags = flags[:-1] if densify else flags
    assert soar(["quantize", str(d), *flags, "--num-samples", "8", "--seq-len", "32",
                 "--out", str(out)]) == 0
    common = dict(dtype="float32", kv_cache_memory="32MiB", block_size=4,
                  quantization="densify" if densify else None)
    one = LLM(str(out), **common)
    model = one.llm_engine.executor.runner.model
    names = {"model.layers.1.self_attn.o_proj": 1, "model.layers.1.mlp.down_proj": 1,
             "model.layers.1.mlp.gate_up_proj": 0}
    ref = {n: dequantized_weight(model.get_submodule(n)) for n in names}
    sparse = "2:4" in flags and not densify
    prompt = [[5, 17, 33, 2, 41, 9]]
    scored = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)
    ref_out = one.generate(prompt, scored)[0].outputs[0]
    if sparse:
        assert type(model.get_submodule("model.layers.1.mlp.down_proj").quant_method).__name__ \
            == "Sparse24Method"
    del one, model
    llm = LLM(str(out), **common, tensor_parallel_size=2)
    try:
        if sparse:  # still the compressed layout (kept values, mask) on the ranks
            assert all(llm.llm_engine.executor.collective_rpc(
                "parameter_bytes", "layers.1.mlp.down_proj.values"))
        got = llm.generate(prompt, scored)[0].outputs[0]
        assert got.token_ids == ref_out.token_ids
        for t, a, b in zip(got.token_ids, got.logprobs, ref_out.logprobs):
            assert abs(a[t].logprob - b[t].logprob) < 2e-2  # the int kernels multiply in bfloat16
        for n, dim in names.items():
            for r, w in enumerate(llm.llm_engine.executor.collective_rpc("dequantized_weight", n)):
                full = ref[n]
                if dim == 1:
                    half = full.shape[1] // 2
                    want = full[:, r * half:(r + 1) * half]
                else:  # gate rows, then up rows of this rank
                    inter = full.shape[0] // 2
                    q = inter // 2
                    want = torch.cat([full[r * q:(r + 1) * q], full[inter + r * q:inter + (r + 1) * q]])
                torch.testing.assert_close(w, want, atol=0, rtol=0)
    finally:
        llm.llm_engine.shutdown()


def _dispatch_rank(rank: int, port: int) -> None:
    import torch.distributed as dist

    from soarllm.model.layers.fused_moe import FusedMoE
    from soarllm.model.parallel_state import TPGroup

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        tp = TPGroup(rank=rank, world_size=2)
        gen = torch.Generator().manual_seed(0)
        w13, w2 = torch.randn(4, 64, 16, generator=gen), torch.randn(4, 16, 32, generator=gen)
        moe = FusedMoE(4, 2, 16, 32, True, tp=tp, expert_parallel=True)
        moe.gate_up_proj.data.copy_(w13[2 * rank:2 * rank + 2])
        moe.down_proj.data.copy_(w2[2 * rank:2 * rank + 2])
        for tokens in (0, 1, 2, 5):  # none, fewer than the ranks, even, uneven shares
            x, logits = torch.randn(tokens, 16, generator=gen), torch.randn(tokens, 4, generator=gen)
            moe.all_to_all = False
            want = tp.all_reduce(moe(x, logits).clone())
            moe.all_to_all = True
            torch.testing.assert_close(moe(x, logits), want, atol=1e-5, rtol=1e-5)
    finally:
        dist.destroy_process_group()


def test_all_to_all_dispatch_with_no_or_uneven_token_shares():
    """A step of fewer tokens than ranks leaves a rank nothing to send: the all-to-all still
    equals the all-reduce's sum."""
    import torch.multiprocessing as mp

    from soarllm.distributed.multiproc import free_port

    mp.spawn(_dispatch_rank, args=(free_port(),), nprocs=2, join=True)
