"""CUDA-graph decode steps without a GPU: the static buffers, padding rows and replay bookkeeping of
model/cuda_graph.py, with each "graph" replayed as an eager call on the static buffers. The Triton
backend runs under the interpreter (tests/kernels/conftest.py's switch and patches).

Padding rows (slot -1, context 0) must neither write KV nor disturb the real rows, and a step's
tokens must equal those of the reference backend run without graphs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="Triton is a test dependency (interpreter on CPU)")

from soarllm import LLM, SamplingParams  # noqa: E402
from soarllm.model.cuda_graph import DecodeGraphs, capture_sizes  # noqa: E402
from soarllm.model.forward_context import set_forward_context  # noqa: E402
from tests.tiny import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


class _EagerReplay:
    """Stands in for a captured graph: replay() runs the stack on the static buffers."""

    def __init__(self, graphs: DecodeGraphs, size: int, out: torch.Tensor):
        self.graphs, self.size, self.out = graphs, size, out

    def replay(self) -> None:
        g, n = self.graphs, self.size
        with set_forward_context(g._meta(n), g.backend):
            self.out.copy_(g.backbone(g.input_ids[:n], g.positions[:n], g.kv_caches))


class EagerGraphs(DecodeGraphs):
    replays = 0

    def _capture_one(self, size, pool):
        with set_forward_context(self._meta(size), self.backend):
            out = self.backbone(self.input_ids[:size], self.positions[:size], self.kv_caches)
        return _EagerReplay(self, size, out), out

    def run(self, input_ids, meta):
        EagerGraphs.replays += 1
        return super().run(input_ids, meta)


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(6) == [1, 2, 4, 6]
    assert capture_sizes(64)[-3:] == [48, 56, 64]
    assert capture_sizes(1000)[-1] == 256


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU stand-in for graph replay (Triton's "
                    "interpreter); on a GPU tests/engine/test_gpu_engine.py replays real graphs")
def test_padded_replay_matches_reference(tiny_llama_dir):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]  # 3 rows -> padded to 4
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ref = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", attention_backend="reference",
              max_num_seqs=4, block_size=4, kv_cache_memory="512MiB")
    fast = LLM(str(tiny_llama_dir), device="cpu", dtype="float32", attention_backend="triton",
               max_num_seqs=4, block_size=4, kv_cache_memory="512MiB")
    runner = fast.llm_engine.executor.runner
    graphs = EagerGraphs(runner.backbone, runner.backend, runner.kv_caches, max_rows=4,
                         max_blocks=runner.input_batch.max_num_blocks, device="cpu")
    graphs.capture()
    assert sorted(graphs.outputs) == [1, 2, 4]
    runner.graphs = graphs
    before = EagerGraphs.replays
    a = [o.outputs[0].token_ids for o in ref.generate(prompts, sp)]
    b = [o.outputs[0].token_ids for o in fast.generate(prompts, sp)]
    assert EagerGraphs.replays - before >= 10  # decode steps went through the graphs
    assert a == b
