"""Our model's logits equal transformers' on the same weights, for a flat batch that mixes a
prefill chunk continuing on cached KV, fresh prefills of different lengths, and decodes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from soarllm.kernels.attention import AttentionMetadata, ReferenceAttentionBackend
from soarllm.model.registry import resolve_model_class

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
LLAMA3_ROPE = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}

CASES = {
    "llama": (LlamaConfig(**SMALL), LlamaForCausalLM),
    "llama3-rope": (LlamaConfig(**SMALL, rope_scaling=LLAMA3_ROPE), LlamaForCausalLM),
    "llama-tied": (LlamaConfig(**SMALL, tie_word_embeddings=True), LlamaForCausalLM),
    "qwen2-qkv-bias": (Qwen2Config(**SMALL), Qwen2ForCausalLM),
    "mistral-sliding-window": (MistralConfig(**SMALL, sliding_window=6), MistralForCausalLM),
    "gemma3": (
        Gemma3TextConfig(
            **{**SMALL, "num_hidden_layers": 3, "num_key_value_heads": 1}, head_dim=32,
            sliding_window=5, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24, final_logit_softcapping=30.0,
        ),
        Gemma3ForCausalLM,
    ),
}
BLOCK = 4


class PagedRun:
    """Drives our model step by step over a paged cache, each request with its own blocks."""

    def __init__(self, model, cfg, seqs):
        self.model, self.seqs = model, seqs
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.caches = [
            torch.zeros(2, 128, BLOCK, cfg.num_key_value_heads, head_dim)
            for _ in range(cfg.num_hidden_layers)
        ]
        # Scatter each request over non-contiguous blocks, to exercise the block table.
        rng = np.random.default_rng(0)
        perm = rng.permutation(128)
        self.tables = [perm[i * 16 : (i + 1) * 16].tolist() for i in range(len(seqs))]

    def step(self, chunks):
        """chunks: (request, start, n), decodes (n == 1) first. Returns last-token logits."""
        ids, pos, slots, qsl, lens = [], [], [], [0], []
        for r, s, n in chunks:
            ids += self.seqs[r][s : s + n]
            p = np.arange(s, s + n)
            bt = np.array(self.tables[r])
            pos.append(p)
            slots.append(bt[p // BLOCK] * BLOCK + p % BLOCK)
            qsl.append(qsl[-1] + n)
            lens.append(s + n)
        meta = AttentionMetadata(
            positions=torch.from_numpy(np.concatenate(pos)),
            query_start_loc=torch.tensor(qsl),
            seq_lens=torch.tensor(lens),
            slot_mapping=torch.from_numpy(np.concatenate(slots)),
            block_tables=torch.tensor([self.tables[r] for r, _, _ in chunks]),
            logits_indices=torch.tensor([q - 1 for q in qsl[1:]]),
            num_decodes=sum(1 for c in chunks if c[2] == 1),
            query_lens_cpu=[c[2] for c in chunks],
            query_start_loc_cpu=qsl,
            seq_lens_cpu=lens,
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids), meta.positions, self.caches, meta)
            return self.model.compute_logits(hidden[meta.logits_indices])


@pytest.mark.parametrize("name", list(CASES))
def test_mixed_batch_logits_match_transformers(name):
    cfg, hf_cls = CASES[name]
    cfg.architectures = [hf_cls.__name__]
    torch.manual_seed(0)
    hf = hf_cls(cfg).eval()
    with torch.no_grad():  # norms start at zero/one; randomize them so they are tested too
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.normal_(0.0 if isinstance(cfg, Gemma3TextConfig) else 1.0, 0.1)
    ours = resolve_model_class(cfg)(cfg, torch.float32, ReferenceAttentionBackend())
    ours.load_weights(hf.state_dict().items())

    seqs = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (9, 21, 6, 14)]
    run = PagedRun(ours, cfg, seqs)
    run.step([(0, 0, 8), (1, 0, 12), (2, 0, 5)])  # prefills, request 1 only its first chunk
    # decodes of 0 and 2, the rest of request 1's prompt on top of its cached chunk, a new prefill
    got = run.step([(0, 8, 1), (2, 5, 1), (1, 12, 9), (3, 0, 14)])
    with torch.inference_mode():
        want = torch.stack([hf(torch.tensor([seqs[r]])).logits[0, -1] for r in (0, 2, 1, 3)])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
