"""The offline API: LLM(model=...).generate(prompts, SamplingParams) and .chat(messages)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm import tqdm

from soarllm.chat_utils import render_chat
from soarllm.config import DEFAULT_MODEL, EngineArgs
from soarllm.engine.llm_engine import LLMEngine
from soarllm.outputs import RequestOutput
from soarllm.sampling_params import RequestOutputKind, SamplingParams

# A prompt: text, token ids, or vLLM's prompt dicts ({"prompt": text} / {"prompt_token_ids": ids})
Prompt = str | list[int] | dict


def _as_engine_prompt(prompt: Prompt) -> str | list[int]:
    """Text or token ids from any accepted prompt form; vLLM's TextPrompt / TokensPrompt dicts
    included, other keys refused by name."""
    if not isinstance(prompt, dict):
        return prompt
    unknown = set(prompt) - {"prompt", "prompt_token_ids"}
    if unknown:
        raise ValueError(f"prompt keys {sorted(unknown)} are not supported; give 'prompt' (text) "
                         "or 'prompt_token_ids' (token ids)")
    if "prompt_token_ids" in prompt:
        return list(prompt["prompt_token_ids"])
    if "prompt" in prompt:
        return prompt["prompt"]
    raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids' (token ids)")


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_args):
        self.llm_engine = LLMEngine.from_engine_args(EngineArgs.from_kwargs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str | dict) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = [_as_engine_prompt(p) for p in prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError("give one SamplingParams, or one per prompt")
        # offline, only the finished outputs are read: the engine builds no per-step ones
        final = {id(sp): dataclasses.replace(sp, output_kind=RequestOutputKind.FINAL_ONLY)
                 for sp in params}
        params = [final[id(sp)] for sp in params]
        engine = self.llm_engine
        order: dict[str, int] = {}
        try:
            for i, (p, sp) in enumerate(zip(prompts, params)):
                rid = str(next(self._ids))
                engine.add_request(rid, p, sp)
                order[rid] = i
        except Exception:
            engine.abort_request(list(order))
            raise
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc="generate", disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished and out.request_id in order:
                        results[order[out.request_id]] = out
                        bar.update(1)
                take = getattr(engine, "take_failures", None)  # failures the step contained
                failed = [e for rid, e in (take() if take else {}).items() if rid in order]
                if failed:  # the engine contained it; offline, the caller gets the error
                    raise failed[0]
        except BaseException:
            engine.abort_request(list(order))
            raise
        finally:
            bar.close()
        return results  # type: ignore[return-value]

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tok = self.get_tokenizer()
        prompts = [
            tok.encode(render_chat(tok, conv, add_generation_prompt), add_special_tokens=False)
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
