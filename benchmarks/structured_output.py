"""Structured-output overhead: tok/s with a json_schema vs free text, at concurrency 1 and 32, and
the schema compile time (first and cached).

The JSON requests run first; then the free-text requests generate exactly as many tokens each
(ignore_eos, max_tokens = that JSON output's length), so both runs have the same batch shapes and
differ only by the grammar work: compiling, filling each step's bitmask, masking the logits and
advancing the matchers. Runs alternate free / json / free / json and the best of each is kept (a
busy machine only ever makes a run slower). On a shared machine the end-to-end figures move with
the load; the step phases (soarllm.profiling.StepPhases, one more json / free pair) say where the
grammar work goes, outside the forward pass that the load moves most: filling the bitmask is in
"schedule", masking and drawing in "sample", advancing the matchers in "outputs". Compile times come from the compiler the engine uses
(soarllm.structured_output.compiler), on the model's tokenizer.

    python benchmarks/structured_output.py                      # default model, ~1-2 minutes
    python benchmarks/structured_output.py --model PATH --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from soarllm import LLM, SamplingParams
from soarllm.profiling import StepPhases
from soarllm.sampling_params import StructuredOutputParams
from soarllm.structured_output.compiler import GrammarCompiler

OUT = Path(__file__).resolve().parent / "results" / "structured_output"

# a structured edit, as a code assistant would ask for one (bounded: every document is short)
EDIT_SCHEMA = {
    "type": "object",
    "properties": {
        "file": {"type": "string", "maxLength": 40},
        "line": {"type": "integer", "minimum": 1, "maximum": 100000},
        "action": {"enum": ["insert", "replace", "delete"]},
        "summary": {"type": "string", "maxLength": 80},
    },
    "required": ["file", "line", "action", "summary"],
    "additionalProperties": False,
}


def big_schema(n: int = 40) -> dict:
    """A larger schema for the compile figure: n typed properties, nested objects and arrays."""
    props = {}
    for i in range(n):
        kind = i % 4
        if kind == 0:
            props[f"name_{i}"] = {"type": "string", "maxLength": 64}
        elif kind == 1:
            props[f"count_{i}"] = {"type": "integer", "minimum": 0}
        elif kind == 2:
            props[f"tags_{i}"] = {"type": "array", "items": {"enum": ["a", "b", "c"]}}
        else:
            props[f"pos_{i}"] = {"type": "object", "properties": {
                "line": {"type": "integer"}, "col": {"type": "integer"}},
                "required": ["line", "col"], "additionalProperties": False}
    return {"type": "object", "properties": props, "required": list(props)[: n // 2],
            "additionalProperties": False}


TASKS = ["rename the function parse to parse_args", "remove the unused import of os",
         "add a docstring to class Config", "fix the off-by-one in the loop over items",
         "replace print with logging.info", "add type hints to def load(path)",
         "delete the commented-out debug code", "insert a check that n is positive"]
FILES = ["main.py", "utils/io.py", "server/app.py", "cli.py"]


def prompts(llm: LLM, n: int) -> list[str]:
    tok = llm.get_tokenizer()
    out = []
    for i in range(n):
        task, f = TASKS[i % len(TASKS)], FILES[(i // len(TASKS)) % len(FILES)]
        msg = [{"role": "user", "content": f"In {f}, {task}. Answer with the edit as JSON with "
                f"the keys file, line, action and summary."}]
        out.append(tok.apply_chat_template(msg, add_generation_prompt=True, tokenize=False))
    return out


def run(llm: LLM, batch: list[str], params: list[SamplingParams], concurrency: int):
    """(output tokens, seconds, output lengths), ``concurrency`` requests at a time."""
    t = time.perf_counter()
    lengths: list[int] = []
    for i in range(0, len(batch), concurrency):
        outs = llm.generate(batch[i : i + concurrency], params[i : i + concurrency])
        lengths += [len(o.outputs[0].token_ids) for o in outs]
    return sum(lengths), time.perf_counter() - t, lengths


def phases(llm: LLM, batch: list[str], params: list[SamplingParams],
           concurrency: int) -> dict[str, float]:
    """ms per step of each phase over one run (its steps and tokens are the same for json and
    free text, so the phases compare directly)."""
    ph = StepPhases()
    llm.llm_engine.phases = ph
    try:
        run(llm, batch, params, concurrency)
    finally:
        llm.llm_engine.phases = None
    return {k: round(v, 3) for k, v in ph.report()["ms_per_step"].items()}


def throughput(llm: LLM, concurrency: int, num_requests: int, max_tokens: int, rounds: int):
    batch = prompts(llm, num_requests)
    so = StructuredOutputParams(json=EDIT_SCHEMA)
    json_params = [SamplingParams(temperature=0.7, seed=i, max_tokens=max_tokens,
                                  structured_outputs=so) for i in range(num_requests)]
    best = {"json": 0.0, "free": 0.0}
    valid = 0
    for _ in range(rounds):
        n, dt, lengths = run(llm, batch, json_params, concurrency)
        best["json"] = max(best["json"], n / dt)
        free_params = [SamplingParams(temperature=0.7, seed=i, max_tokens=length,
                                      ignore_eos=True) for i, length in enumerate(lengths)]
        n_free, dt_free, _ = run(llm, batch, free_params, concurrency)
        assert n_free == n
        best["free"] = max(best["free"], n_free / dt_free)
        print(f"c={concurrency}: json {n / dt:.1f} tok/s, free text {n_free / dt_free:.1f} tok/s "
              f"({n} tokens)", file=sys.stderr, flush=True)
    step_ms = {"json": phases(llm, batch, json_params, concurrency),
               "free": phases(llm, batch, free_params, concurrency)}
    outside = ("schedule", "prepare", "sample", "outputs")
    grammar_ms = sum(step_ms["json"][k] - step_ms["free"][k] for k in outside)
    for o in llm.generate(batch, json_params):  # the documents parse (one more pass)
        try:
            json.loads(o.outputs[0].text)
            valid += 1
        except ValueError:
            pass
    return {"concurrency": concurrency, "requests": num_requests,
            "output_tokens_per_run": n, "mean_output_tokens": n / num_requests,
            "tok_s_free_text": round(best["free"], 1), "tok_s_json_schema": round(best["json"], 1),
            "slowdown_pct": round(100 * (1 - best["json"] / best["free"]), 1),
            "json_documents_parsed": f"{valid}/{num_requests}",
            "ms_per_step": step_ms,
            # the grammar's cost per step outside the forward pass, and as a share of a free step
            "grammar_ms_per_step": round(grammar_ms, 3),
            "grammar_share_of_free_step_pct": round(
                100 * grammar_ms / sum(step_ms["free"].values()), 1)}


def compile_times(llm: LLM) -> dict:
    engine = llm.llm_engine
    tok = llm.get_tokenizer()
    out = {}
    t = time.perf_counter()
    compiler = GrammarCompiler(tok, engine.vocab_size, engine.eos_token_ids)
    compiler.ll_tokenizer  # noqa: B018  (built once per engine, on the first grammar)
    out["tokenizer_setup_ms"] = round(1e3 * (time.perf_counter() - t), 2)
    for name, schema in (("edit_schema", EDIT_SCHEMA), ("big_schema_40_props", big_schema())):
        so = StructuredOutputParams(json=schema)
        t = time.perf_counter()
        compiler.compile(so)
        first = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(100):
            compiler.compile(so)
        cached = (time.perf_counter() - t) / 100
        out[name] = {"first_ms": round(1e3 * first, 3), "cached_ms": round(1e3 * cached, 4)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--c1-requests", type=int, default=3)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32],
                    help="concurrencies to measure (requests: --c1-requests at 1, else as many)")
    ap.add_argument("--out", type=Path, default=OUT / "result.json")
    ap.add_argument("--note", default="", help="recorded with the results (e.g. the machine's load)")
    args = ap.parse_args()
    llm = LLM(args.model, max_model_len=1024, enable_prefix_caching=False)
    llm.generate(["warm up"], SamplingParams(max_tokens=4))
    result = {
        "model": args.model,
        "device": llm.llm_engine.args.resolved_device(),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
        "note": args.note,
        "compile": compile_times(llm),
        "throughput": [throughput(llm, c, args.c1_requests if c == 1 else c, args.max_tokens,
                                  args.rounds) for c in args.concurrency],
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
