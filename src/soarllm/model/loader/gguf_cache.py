"""The GGUF conversion cache: dequantize once, then start from memory-mapped safetensors.

Reading a GGUF is slow (parsing a 250k-token vocab, dequantizing every tensor, building the HF
tokenizer). The first load writes `$SOARLLM_HOME/converted/<stem>-<key>/` holding config.json, the
tokenizer files (with the chat template) and float32 safetensors under HF names; later loads read
only that directory. The key changes with the file (absolute path, size, mtime) and with
GGUF_CONVERTER_VERSION (soarllm.hub), so an edited GGUF or a fixed converter never reuses a stale cache. The directory
is written under a temporary name and renamed into place: it exists whole or not at all.

The conversion takes seconds to minutes, so it shows one progress bar on stderr over all of its
steps (tokenizer, each tensor, writing), not only over the tensors, and logs where it wrote.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from soarllm.errors import ConfigError
from soarllm.hub import (
    GGUF_CONVERTER_VERSION,
    GGUF_SOURCE_FILE,
    cached_conversion,
    conversion_dir,
)
from soarllm.model.loader.hf_files import SAFETENSORS_INDEX

SHARD_BYTES = 2 * 2**30
_TMP_PREFIX = ".tmp-"
# The cache's location and key live in soarllm.hub (importable without torch): bump
# GGUF_CONVERTER_VERSION there when the conversion's output changes.

logger = logging.getLogger(__name__)


def ensure_converted(gguf_path: Path, progress: bool = True) -> Path:
    """The conversion cache directory of `gguf_path`, built first if missing."""
    found = cached_conversion(gguf_path)
    if found is not None:
        return found
    target = conversion_dir(gguf_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(target)
    tmp = target.with_name(f"{_TMP_PREFIX}{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    start = time.perf_counter()
    try:
        convert(gguf_path, tmp, progress=progress)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first: keep its copy
            if cached_conversion(gguf_path) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1fs (once; later loads read %s)", gguf_path.name,
                time.perf_counter() - start, target)
    return target


def convert(gguf_path: Path, out_dir: Path, progress: bool = True) -> None:
    """Write config.json, tokenizer files and float32 safetensors of `gguf_path` into out_dir."""
    from gguf import GGUFReader
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from soarllm.model.loader.chat_templates import fallback_chat_template
    from soarllm.model.loader.gguf_config import (
        add_end_of_turn_ids,
        config_from_gguf,
        gguf_architecture,
    )
    from soarllm.model.loader.gguf_tensors import hf_tensors

    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read {gguf_path} as GGUF ({e}); is the file complete?") from None
    config = config_from_gguf(reader)
    # One step for the tokenizer, one per tensor, one for the writing that follows the last.
    bar = tqdm(total=len(reader.tensors) + 2, unit="step", disable=not progress, file=sys.stderr,
               desc=f"converting {gguf_path.name} (first load only)")
    with bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        if tokenizer.chat_template is None:
            tokenizer.chat_template = fallback_chat_template(gguf_architecture(reader))
        tokenizer.save_pretrained(out_dir)
        add_end_of_turn_ids(config, tokenizer.get_vocab())
        config.save_pretrained(out_dir)
        bar.update(1)
        bar.set_postfix_str("dequantizing tensors")
        _save_sharded(_counted(hf_tensors(reader, config, progress=False), bar), out_dir)
        bar.update(1)
    stat = gguf_path.stat()
    source = {
        "gguf": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "converter_version": GGUF_CONVERTER_VERSION,
    }
    (out_dir / GGUF_SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _counted(tensors: Iterable[tuple[str, torch.Tensor]], bar) -> Iterator[tuple[str, torch.Tensor]]:
    for item in tensors:
        yield item
        bar.update(1)
    bar.set_postfix_str("writing safetensors")


def _save_sharded(tensors: Iterable[tuple[str, torch.Tensor]], out_dir: Path) -> None:
    """Save in shards of about SHARD_BYTES, so a large model never sits in memory whole."""
    from safetensors.torch import save_file

    weight_map: dict[str, str] = {}
    for index, shard in enumerate(_shards(tensors), start=1):
        file = f"model-{index:05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index_json = {"metadata": {}, "weight_map": weight_map}
    (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index_json, indent=2) + "\n")


def _shards(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in tensors:
        shard[name] = tensor
        size += tensor.numel() * tensor.element_size()
        if size >= SHARD_BYTES:
            yield shard
            shard, size = {}, 0
    if shard:
        yield shard


def _remove_abandoned(target: Path) -> None:
    """Delete temporary directories that a crashed conversion of the same file left behind."""
    for tmp in target.parent.glob(f"{_TMP_PREFIX}{target.name}-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
