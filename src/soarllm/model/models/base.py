"""What every causal LM here shares: KV layout, the LM head and weight loading.

The LM head is a Linear like every projection. With tied embeddings an unquantized head shares
the embedding's weight; a quantized head (a GGUF file whose token embedding is Q4_0/Q4_1/Q4_K or
Q8_0) gets a quantized copy of it while the embedding lookup reads a dequantized table. Such a
head computes up to QUANTIZED_HEAD_MAX_ROWS rows with its quantized copy (half or a quarter of the
bytes) and larger batches with the dequantized table, where the int4 kernel is bound by its
arithmetic. The default model's Q8_0 head (two int4 planes, soarllm's int4 GEMM) against the
bfloat16 table, ms per call with cold caches on the 2-core CPU: 1 row 1.6 / 4.8, 8 rows 4.9 /
6.3, 12 rows 7.0 / 7.2, 16 rows 9.3 / 7.9, 32 rows 16.0 / 11.6. A method may set its own limit
(``QuantMethod.tied_head_max_rows``): the Q8_0 head on the VNNI kernel (quant/gguf.Q8VnniMethod)
is faster than the table at every row count measured (`benchmarks/cpu_int4_prefill.py --head`:
1 row 0.7 / 3.3 ms, 32 rows 4.3 / 8.0, 64 rows 8.7 / 12.8) and never hands over.

Weights load through the layers: each checkpoint tensor goes to the `weight_loader` of the
parameter that owns it, with the shard id of a merged layer (q/k/v, gate/up); quantized layers
repack or quantize what they receive. Afterwards every QuantMethod turns its parameters into its
kernel's layout (`process_weights_after_loading`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from soarllm.kernels.attention import AttentionMetadata, ReferenceAttentionBackend
from soarllm.model.forward_context import set_forward_context
from soarllm.model.layers.linear import Linear
from soarllm.model.layers.parallel_linear import parallel_lm_head
from soarllm.model.parallel_state import TPGroup, kv_head_range
from soarllm.quant.base import QuantizationConfig, UnquantizedMethod, default_weight_loader

QUANTIZED_HEAD_MAX_ROWS = 12  # rows of logits a tied quantized LM head computes itself

# Checkpoint tensors that carry no weights we need (precomputed rope tables and the like).
_SKIPPED = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
_EMBEDDING = "model.embed_tokens.weight"
_LAYER_INDEX = re.compile(r"(?:model\.|model\.language_model\.)?layers\.(\d+)\.")

logger = logging.getLogger(__name__)


class DecoderForCausalLM(nn.Module):
    # checkpoint name fragment -> (merged parameter fragment, shard): the weight-name table
    packed_modules: dict[str, tuple[str, str]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    # models whose layers shard over tensor-parallel ranks (they take a ``tp`` argument)
    supports_tensor_parallel: bool = False
    # one cache plane per token vector that is key and value at once (MLA's latent), instead
    # of separate K and V planes; num_kv_heads x head_dim then size that one vector
    latent_kv_cache: bool = False

    def __init__(self, config, dtype, quant_config: QuantizationConfig | None = None, backend=None,
                 tp: TPGroup | None = None):
        super().__init__()
        self.tp = tp or TPGroup.single()
        # what forward(..., meta) attends with; the runner passes its own in the forward context
        self.attn_backend = backend if backend is not None else ReferenceAttentionBackend()
        self.config = config
        self.dtype = dtype
        self.quant_config = quant_config
        text = getattr(config, "text_config", None) or config
        self.num_layers = text.num_hidden_layers
        # KV heads this rank holds (and caches): all of them at world size 1
        self.num_kv_heads = kv_head_range(
            getattr(text, "num_key_value_heads", None) or text.num_attention_heads, self.tp)[1]
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.vocab_size = text.vocab_size
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))

    def build_lm_head(self, embedding: nn.Embedding) -> None:
        hidden = embedding.weight.shape[1]
        if self.tp.world_size > 1:  # this rank's rows of the (padded) vocabulary
            self.lm_head = parallel_lm_head(hidden, self.vocab_size, tp=self.tp, dtype=self.dtype,
                                            quant_config=self.quant_config, prefix="lm_head")
        else:
            self.lm_head = Linear(hidden, self.vocab_size, bias=False, dtype=self.dtype,
                                  quant_config=self.quant_config, prefix="lm_head")
        # a tied unquantized head is the embedding table itself
        self.head_shares_embedding = self.tie_word_embeddings and isinstance(
            self.lm_head.quant_method, UnquantizedMethod
        )
        if self.head_shares_embedding:
            self.lm_head.weight = embedding.weight
        # a tied quantized head: the dequantized table serves large batches (module docstring);
        # read through a function, not held as an attribute (that would register the table as a
        # second parameter name)
        self._dense_head_table = ((lambda: embedding.weight) if self.tie_word_embeddings
                                  and not self.head_shares_embedding and self.tp.world_size == 1
                                  else None)

    @property
    def dense_head_weight(self) -> torch.Tensor | None:
        """The dequantized embedding table a tied quantized head uses for large batches."""
        return self._dense_head_table() if self._dense_head_table is not None else None

    def forward(self, input_ids, positions, kv_caches, meta: AttentionMetadata) -> torch.Tensor:
        """The decoder stack (``self.model``) with ``meta`` as the forward context; the runner
        calls ``self.model`` itself (possibly compiled) under its own context."""
        with set_forward_context(meta, self.attn_backend):
            return self.model(input_ids, positions, kv_caches)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        dense = self.dense_head_weight
        limit = getattr(self.lm_head.quant_method, "tied_head_max_rows", None)
        if dense is not None and hidden.shape[0] > (limit or QUANTIZED_HEAD_MAX_ROWS):
            return F.linear(hidden.to(dense.dtype), dense)
        logits = self.lm_head(hidden)
        if self.tp.world_size > 1:  # every rank's vocabulary rows, the padding cut off
            logits = self.tp.all_gather(logits, dim=-1)[..., : self.vocab_size]
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load checkpoint tensors (HF names) through the layers; returns the loaded params."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        beyond = 0
        for name, tensor in weights:
            if name.endswith(_SKIPPED):
                continue
            layer = _LAYER_INDEX.match(name)
            if layer is not None and int(layer.group(1)) >= self.num_layers:
                beyond += 1  # a model cut to its first layers (hf_overrides, a self-draft)
                continue
            if self.tie_word_embeddings and name == "lm_head.weight":
                continue
            loaded.add(self._load_one(name, tensor, params))
            if name == _EMBEDDING and self.tie_word_embeddings and not self.head_shares_embedding:
                loaded.add(self._load_one("lm_head.weight", tensor, params))
        if beyond:
            logger.info("skipped %d checkpoint tensors of layers past the model's %d", beyond,
                        self.num_layers)
        missing = {n for n, p in params.items() if n not in loaded and not _filled(n, p, loaded)}
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:5]}")
        for module in self.modules():
            qm = getattr(module, "quant_method", None)
            if qm is not None:
                qm.process_weights_after_loading(module)
        return loaded

    def _load_one(self, name: str, tensor, params: dict[str, nn.Parameter]) -> str:
        """Route one checkpoint tensor to its parameter's loader; returns the parameter's name."""
        shard = None
        for frag, (merged, shard_id) in self.packed_modules.items():
            if f".{frag}." in name:
                name, shard = name.replace(f".{frag}.", f".{merged}."), shard_id
                break
        module_name, suffix = name.rsplit(".", 1)
        try:
            module = self.get_submodule(module_name)
        except AttributeError:
            raise KeyError(f"checkpoint tensor {name!r} has no matching parameter") from None
        if isinstance(module, Linear):
            param = module.checkpoint_param(suffix)
            target = f"{module_name}.{module.quant_method.checkpoint_params.get(suffix)}"
        else:
            target = name
            param = params.get(name)
        if param is None:
            raise KeyError(f"checkpoint tensor {name!r} has no matching parameter")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        return target


def _filled(name: str, param: nn.Parameter, loaded: set[str]) -> bool:
    """Whether a parameter its layer fills from another one's tensor (scales beside a packed
    weight) was loaded that way."""
    filled_by = getattr(param, "filled_by", None)
    return filled_by is not None and f"{name.rsplit('.', 1)[0]}.{filled_by}" in loaded
