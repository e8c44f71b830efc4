"""The compiled model step (torch.compile, inductor) against the eager one on the same weights:
identical greedy tokens in float32 across batch sizes, chunked prefill, preemption and prefix hits;
no recompilation after warm-up; compiled steps saved and loaded by a later start; and eager
fallbacks that never break the engine."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from torch._dynamo.utils import counters

from soarllm import LLM, SamplingParams
from soarllm.model import compilation
from tests.tiny import make_tiny_model

# The engines hold a few short requests: a small KV pool instead of the CPU default (up to 4 GiB,
# millions of these 2 KiB blocks, each a Python object built at start-up).
KV = "32MiB"

pytestmark = pytest.mark.slow  # each compiled engine spends tens of seconds in inductor


def _prompts(vocab: int, n: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _params(n: int) -> list[SamplingParams]:
    # different lengths: requests finish one after another, so the batch shrinks step by step
    return [SamplingParams(temperature=0.0, max_tokens=8 + 3 * i, ignore_eos=True) for i in range(n)]


def _ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="module")
def eager(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", kv_cache_memory=KV,
               block_size=4, enforce_eager=True)


@pytest.fixture(scope="module", autouse=True)
def aot_dir(tmp_path_factory):
    # compiled steps go to a directory of this module's own: the first engine compiles
    path = tmp_path_factory.mktemp("aot")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compilation, "aot_cache_dir", lambda: path)
        yield path


# chunked prefill with a small budget, a KV cache too small for the whole batch (preemption),
# prefix caching on: the compiled step sees every kind of flat batch
COMPILED = dict(dtype="float32", block_size=4, enforce_eager=False, max_num_batched_tokens=24,
                num_gpu_blocks_override=48, max_model_len=128)


def _backbone(llm) -> compilation.CompiledBackbone:
    runner = llm.llm_engine.executor.runner
    assert isinstance(runner.backbone, compilation.CompiledBackbone), "fell back to eager"
    return runner.backbone


@pytest.fixture(scope="module")
def compiled(tiny_llama_dir, aot_dir):
    llm = LLM(str(tiny_llama_dir), **COMPILED)
    backbone = _backbone(llm)
    assert (backbone.compiled, backbone.loaded) == (len(compilation.WARMUP_SIZES), 0)
    assert len(list(aot_dir.glob("*.bin"))) == len(compilation.WARMUP_SIZES)
    return llm


def test_compiled_equals_eager_across_batch_sizes_chunking_and_preemption(eager, compiled):
    vocab = eager.llm_engine.vocab_size
    prompts = _prompts(vocab, 13, 3, 70, seed=0)
    params = _params(len(prompts))
    want = _ids(eager.generate(prompts, params))
    assert _ids(compiled.generate(prompts[:1], params[:1])) == want[:1]  # batch 1
    assert _ids(compiled.generate(prompts, params)) == want
    assert compiled.llm_engine.get_stats().num_preemptions > 0


def test_compiled_prefix_hit_equals_eager(eager, compiled):
    shared = _prompts(eager.llm_engine.vocab_size, 1, 40, 40, seed=1)[0]
    a, b = shared + [5, 6, 7], shared + [8, 9]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = _ids(eager.generate([b], params))
    compiled.generate([a], params)
    out = compiled.generate([b], params)
    assert out[0].num_cached_tokens > 0
    assert _ids(out) == want


def test_no_recompilation_after_warm_up(compiled):
    before = dict(counters["stats"])
    prompts = _prompts(compiled.llm_engine.vocab_size, 9, 1, 50, seed=2)
    compiled.generate(prompts, _params(len(prompts)))
    compiled.generate(prompts[:2], _params(2))
    assert counters["stats"]["unique_graphs"] == before["unique_graphs"]


def test_a_second_start_loads_the_compiled_steps(tiny_llama_dir, eager, compiled, tmp_path):
    # A later engine of the same shapes (this model, or another one with other weights) loads the
    # saved graphs instead of compiling, and each runs its own weights: they are graph inputs.
    other_dir = make_tiny_model(tmp_path / "other", "llama", seed=1)
    other_eager = LLM(str(other_dir), dtype="float32", kv_cache_memory=KV, block_size=4,
                      enforce_eager=True)
    prompts = _prompts(eager.llm_engine.vocab_size, 5, 3, 40, seed=6)
    params = _params(len(prompts))
    before = counters["stats"]["unique_graphs"]
    for model_dir, oracle in ((tiny_llama_dir, eager), (other_dir, other_eager)):
        llm = LLM(str(model_dir), **COMPILED)
        backbone = _backbone(llm)
        assert (backbone.compiled, backbone.loaded) == (0, len(compilation.WARMUP_SIZES))
        assert _ids(llm.generate(prompts, params)) == _ids(oracle.generate(prompts, params))
    assert counters["stats"]["unique_graphs"] == before  # dynamo traced nothing


def test_a_second_start_can_serve_eagerly_while_it_loads_the_compiled_steps(
        tiny_llama_dir, eager, compiled):
    # load_compiled_in_background (soar serve's default): the engine is ready before the saved
    # graphs are loaded; the steps meanwhile run eagerly and the first step after the load runs
    # the loaded graphs, with the same tokens throughout.
    prompts = _prompts(eager.llm_engine.vocab_size, 5, 3, 40, seed=8)
    params = _params(len(prompts))
    want = _ids(eager.generate(prompts, params))
    before = counters["stats"]["unique_graphs"]
    llm = LLM(str(tiny_llama_dir), load_compiled_in_background=True, **COMPILED)
    runner = llm.llm_engine.executor.runner
    assert _ids(llm.generate(prompts, params)) == want  # eager, compiled or both
    assert runner.wait_for_compiled(timeout=120)
    backbone = _backbone(llm)
    assert (backbone.compiled, backbone.loaded) == (0, len(compilation.WARMUP_SIZES))
    assert _ids(llm.generate(prompts, params)) == want
    assert counters["stats"]["unique_graphs"] == before  # dynamo traced nothing


def test_a_saved_step_that_does_not_load_in_the_background_leaves_the_engine_eager(
        tiny_llama_dir, eager, compiled, aot_dir, caplog):
    saved = {p: p.read_bytes() for p in aot_dir.glob("*.bin")}
    try:
        for path in saved:
            path.write_bytes(b"not a compiled graph")
        with caplog.at_level(logging.WARNING, logger="soarllm.model.runner"):
            llm = LLM(str(tiny_llama_dir), load_compiled_in_background=True, **COMPILED)
            runner = llm.llm_engine.executor.runner
            assert not runner.wait_for_compiled(timeout=120)
        assert "running the model eagerly (the next start compiles it again)" in caplog.text
        assert not any(p.exists() for p in saved)  # so that the next start compiles afresh
        prompts = _prompts(eager.llm_engine.vocab_size, 3, 3, 30, seed=9)
        assert _ids(llm.generate(prompts, _params(3))) == _ids(eager.generate(prompts, _params(3)))
    finally:
        for path, data in saved.items():
            path.write_bytes(data)


def test_an_unreadable_saved_step_is_compiled_again(tiny_llama_dir, eager, compiled, aot_dir,
                                                    caplog):
    for path in aot_dir.glob("*.bin"):
        path.write_bytes(b"not a compiled graph")
    with caplog.at_level(logging.INFO, logger="soarllm.model.compilation"):
        llm = LLM(str(tiny_llama_dir), **COMPILED)
    assert "unusable" in caplog.text
    assert _backbone(llm).compiled == len(compilation.WARMUP_SIZES)
    prompts = _prompts(eager.llm_engine.vocab_size, 3, 3, 30, seed=7)
    assert _ids(llm.generate(prompts, _params(3))) == _ids(eager.generate(prompts, _params(3)))


def test_two_compiled_models_of_one_architecture_keep_their_own_graphs(
        tiny_llama_dir, eager, compiled, tmp_path):
    # After warm-up a call evaluates only the guards that tell cached graphs apart; a second model
    # of the same class (other weights) adds graphs to the same code's cache, and each engine must
    # still run its own, alternating, for one token and for several.
    other_dir = make_tiny_model(tmp_path / "other", "llama", seed=1)
    other = LLM(str(other_dir), dtype="float32", kv_cache_memory=KV, block_size=4,
                enforce_eager=False)
    other_eager = LLM(str(other_dir), dtype="float32", kv_cache_memory=KV, block_size=4,
                      enforce_eager=True)
    prompts = _prompts(eager.llm_engine.vocab_size, 3, 4, 20, seed=4)
    params = _params(len(prompts))
    want, want_other = _ids(eager.generate(prompts, params)), _ids(other_eager.generate(prompts, params))
    assert want != want_other  # the two models differ
    for _ in range(2):
        assert _ids(compiled.generate(prompts[:1], params[:1])) == want[:1]
        assert _ids(other.generate(prompts[:1], params[:1])) == want_other[:1]
        assert _ids(compiled.generate(prompts, params)) == want
        assert _ids(other.generate(prompts, params)) == want_other


def test_a_quantized_and_a_float_model_of_one_architecture_both_run_compiled(tiny_llama_dir):
    # a draft model is often the target quantized: same class, other parameters (qweight in
    # place of weight). Each compiled engine runs its own graphs, as its eager twin does.
    engines = {}
    for quant in ("none", "w4a16"):
        for eager_ in (True, False):
            engines[quant, eager_] = LLM(str(tiny_llama_dir), dtype="bfloat16",
                                         quantization=quant, kv_cache_memory=KV, block_size=4,
                                         enforce_eager=eager_)
    prompts = _prompts(engines["none", True].llm_engine.vocab_size, 3, 4, 20, seed=5)
    params = _params(len(prompts))
    for _ in range(2):
        for quant in ("none", "w4a16"):
            want = _ids(engines[quant, True].generate(prompts, params))
            got = _ids(engines[quant, False].generate(prompts, params))
            same = sum(a == b for a, b in zip(want, got))
            assert same >= 2, f"{quant}: {same} of 3 requests as eager (bfloat16)"


def test_an_input_the_warm_up_did_not_cover_runs_as_eagerly(eager, compiled):
    # after warm-up no guard is checked: an input the warm-up did not make (here: ids made outside
    # inference mode, which the runner never passes) runs the graph for its token count, with
    # the same result as eagerly
    from soarllm.model.forward_context import set_forward_context
    from soarllm.model.runner import _warmup_metadata

    runner, eager_runner = compiled.llm_engine.executor.runner, eager.llm_engine.executor.runner
    meta = _warmup_metadata(2, "cpu")
    ids = torch.tensor([5, 7])
    outs = []
    for r in (runner, eager_runner):
        for cache in r.kv_caches:
            cache[:, 0].zero_()
        with torch.inference_mode(), set_forward_context(meta, r.backend):
            outs.append(r.backbone(ids, meta.positions, r.kv_caches).clone())
        for cache in r.kv_caches:
            cache[:, 0].zero_()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_no_cxx_compiler_runs_eagerly_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(compilation, "cxx_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="soarllm.model.compilation"):
        assert compilation.compile_backbone(torch.nn.Identity(), "cpu", enforce_eager=False) is None
    assert len(caplog.records) == 1 and "C++ compiler" in caplog.records[0].getMessage()


def test_a_failing_compile_leaves_the_engine_eager_and_working(eager, monkeypatch, caplog):
    runner = eager.llm_engine.executor.runner
    prompts = _prompts(eager.llm_engine.vocab_size, 3, 5, 30, seed=3)
    want = _ids(eager.generate(prompts, _params(3)))

    class Broken:
        def warm_up(self, *args):
            raise RuntimeError("inductor exploded")

    monkeypatch.setattr(runner.args, "enforce_eager", False)
    monkeypatch.setattr("soarllm.model.runner.compile_backbone", lambda *a, **k: Broken())
    with caplog.at_level(logging.WARNING, logger="soarllm.model.runner"):
        runner.compile_and_warm_up()
    assert "running the model eagerly" in caplog.text
    assert runner.backbone is runner.model.model
    assert _ids(eager.generate(prompts, _params(3))) == want


def test_compiled_decode_steps_attend_in_cpp_and_other_steps_in_python(compiled, monkeypatch):
    # On CPU the compiled step's attention op has a C++ kernel (kernels/csrc/attention_op.cpp):
    # a step of decode rows only never enters the Python backend; steps with prefill rows do
    # (the kernel hands them to the op's Python implementation). Their tokens = eager's: above.
    backend = compiled.llm_engine.executor.runner.backend
    assert backend.name == "cpu" and backend._compiled_op
    python_calls = []
    forward = backend.forward

    def counting(q, k, v, kv_cache, meta, *args, **kwargs):
        python_calls.append(meta.num_decodes == q.shape[0])
        return forward(q, k, v, kv_cache, meta, *args, **kwargs)

    monkeypatch.setattr(backend, "forward", counting)
    prompts = _prompts(compiled.llm_engine.vocab_size, 3, 10, 20, seed=4)
    outs = compiled.generate(prompts, _params(len(prompts)))
    assert all(len(o.outputs[0].token_ids) > 1 for o in outs)  # decode steps ran
    assert python_calls and not any(python_calls)


def test_saved_steps_are_kept_per_instruction_set(compiled, monkeypatch):
    """A saved step was built for this CPU's vector instructions: a cache directory shared with a
    machine of another instruction set (an NFS home) must not hand it over, and loading it here
    skips inductor's probe of the instruction set (it compiled here before)."""
    import torch._inductor.config as inductor_config

    backbone = _backbone(compiled)
    kv = compiled.llm_engine.executor.runner.kv_caches
    here = compilation.graph_key(backbone.backbone, kv, backbone.cache_tag)
    assert compilation.graph_key(backbone.backbone, kv, backbone.cache_tag) == here
    with monkeypatch.context() as m:  # another CPU's flags (say, with or without AVX-512)
        m.setattr(compilation, "cpu_identity", lambda: "model name: another\nflags: fpu")
        assert compilation.graph_key(backbone.backbone, kv, backbone.cache_tag) != here
    with monkeypatch.context() as m:  # another kernel level chosen by PyTorch
        m.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "ANOTHER")
        assert compilation.graph_key(backbone.backbone, kv, backbone.cache_tag) != here
    # inductor's own patch(), not monkeypatch: undoing a monkeypatch of a setting whose value was
    # None deletes it from torch's config (every later compile in the process then fails)
    with inductor_config.patch({"cpp.vec_isa_ok": None}):
        compilation._trust_vec_isa()
        assert inductor_config.cpp.vec_isa_ok is True
    with inductor_config.patch({"cpp.vec_isa_ok": False}):  # a setting decided it
        compilation._trust_vec_isa()
        assert inductor_config.cpp.vec_isa_ok is False
