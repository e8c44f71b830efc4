"""What to say about a flag `soar` does not know: vLLM's name for something soarllm spells
differently or lacks, else the closest flag the subcommand has."""

from __future__ import annotations

import argparse
import difflib

# vLLM flags (`vllm serve --help`) that soarllm does not accept, with what to do instead. The ones
# soarllm accepts or maps (--model, --gpu-memory-utilization, --served-model-name, --chat-template,
# --trust-remote-code, --enforce-eager, --max-model-len, --max-num-seqs, ...) are real flags.
VLLM_FLAGS: dict[str, str] = {
    "--pipeline-parallel-size": "soarllm splits a model with --tensor-parallel-size only",
    "--data-parallel-size": "only `soar serve` takes it (engine replicas behind one server)",
    "--kv-cache-dtype": "the KV cache uses the model's --dtype",
    "--swap-space": "soarllm recomputes preempted requests; there is no CPU swap space",
    "--cpu-offload-gb": "not supported; lower --max-model-len or --kv-cache-memory instead",
    "--revision": "not supported: download that revision and give its directory as the model",
    "--code-revision": "soarllm never runs code from a checkpoint; leave it out",
    "--download-dir": "models live under $SOARLLM_HOME (default ~/.cache/soarllm)",
    "--tokenizer-mode": "soarllm always uses the fast (tokenizers) tokenizer",
    "--uvicorn-log-level": "use --log-level",
    "--disable-log-requests": "use --no-access-log",
    "--disable-log-stats": "soarllm logs no periodic stats; /metrics has them",
    "--max-log-len": "the access log records no prompt text",
    "--response-role": "the assistant role is always 'assistant'",
    "--lora-modules": "LoRA adapters are not supported",
    "--enable-lora": "LoRA adapters are not supported",
    "--speculative-config": "speculative decoding has no CLI flag yet",
    "--ssl-keyfile": "put a TLS-terminating proxy in front of soar serve",
    "--ssl-certfile": "put a TLS-terminating proxy in front of soar serve",
    "--root-path": "put a proxy in front of soar serve",
    "--max-seq-len-to-capture": "soarllm captures no CUDA graphs; leave it out",
    "--num-scheduler-steps": "soarllm schedules every step; leave it out",
    "--disable-custom-all-reduce": "soarllm all-reduces with torch.distributed; leave it out",
    "--guided-decoding-backend": "structured output always uses llguidance; leave it out",
    "--generation-config": "sampling defaults come from the request",
    "--override-generation-config": "sampling defaults come from the request",
    "--hf-overrides": "use the Python API: LLM(..., hf_overrides={...})",
}


def _flag_name(arg: str) -> str:
    return arg.split("=", 1)[0]


def hint_for(flag: str, known: list[str]) -> str | None:
    """One line about `flag`: what vLLM's flag maps to here, or the closest known flag."""
    name = _flag_name(flag)
    if name in VLLM_FLAGS:
        return f"{name} is vLLM's; soarllm has no such flag: {VLLM_FLAGS[name]}"
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    if close:
        return f"{name}: did you mean {close[0]}?"
    return None


def unknown_flags_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    known = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    lines = [f"unrecognized arguments: {' '.join(extras)}"]
    for arg in extras:
        if arg.startswith("-") and len(arg) > 1:
            hint = hint_for(arg, known)
            if hint:
                lines.append(f"  {hint}")
    if len(lines) == 1 and any(not a.startswith("-") for a in extras):
        lines.append(f"  (see `{parser.prog} --help` for its arguments; quote a prompt that has "
                     "spaces)")
    return "\n".join(lines)
