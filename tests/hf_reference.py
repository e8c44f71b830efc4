"""transformers' reading of a pulled GGUF model, the oracle of the tests that run the real models.

Dequantizing a GGUF into transformers takes 15 to 60 s on two cores, and eight test modules read
the same three files: each is read once per session here and shared. At most two are kept, and
no more than CAP_BYTES of float32 weights (SmolLM2 with Gemma 3 or with Qwen2.5-Coder, ~3.1 GB: the
serve tests between the two Qwen2.5-Coder modules read SmolLM2, which used to push Qwen out and
cost a second 40 s read): the least recently used goes first. Tests only read the models (forward, generate, state_dict):
none may change one."""

from __future__ import annotations

import gc
from collections import OrderedDict
from pathlib import Path

import torch

KEEP = 2
CAP_BYTES = 3_300_000_000
_models: OrderedDict[str, tuple] = OrderedDict()
_greedy: dict[tuple, list[int]] = {}


def hf_gguf(path) -> tuple:
    """(tokenizer, float32 model in eval mode) that transformers reads from the GGUF at path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).resolve()
    key = str(path)
    if key in _models:
        _models.move_to_end(key)
        return _models[key]
    while len(_models) >= KEEP:
        _models.popitem(last=False)
        gc.collect()
    d, name = str(path.parent), path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    _models[key] = (tok, model)
    while len(_models) > 1 and sum(_nbytes(m) for _, m in _models.values()) > CAP_BYTES:
        _models.popitem(last=False)
        gc.collect()
    return tok, model


def _nbytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {p.data_ptr(): p
                                                       for p in model.parameters()}.values())


def hf_greedy(path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation of exactly n tokens, computed once per (model, prompt, n)
    in a session (two parametrizations of one test ask for the same ones)."""
    key = (str(Path(path).resolve()), tuple(ids), n)
    if key not in _greedy:
        _, model = hf_gguf(path)
        with torch.inference_mode():
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                 dtype=torch.long), do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n)
        _greedy[key] = gen[0, len(ids):].tolist()
    return list(_greedy[key])
