"""A/B/A check of speculation at high concurrency: three engines in one process (prompt lookup, no
speculation, and a second identical engine without it), each run on the same 32 open-chat
requests, alternately, three times. The spread between the two identical engines shows how large
a difference this machine can resolve.

    python benchmarks/spec_decode_aba.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spec_decode import workloads  # noqa: E402

from soarllm import LLM, SamplingParams  # noqa: E402


def main() -> None:
    common = dict(enable_prefix_caching=False, max_model_len=2048)
    engines = {
        "ngram": LLM("smollm2-135m-instruct", **common,
                     speculative_config={"method": "ngram", "num_speculative_tokens": 4}),
        "none": LLM("smollm2-135m-instruct", **common),
        "none2": LLM("smollm2-135m-instruct", **common),
    }
    tok = engines["none"].get_tokenizer()
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
               for m, _, _ in workloads(32)["open_chat"]]
    params = SamplingParams(temperature=0, max_tokens=128)
    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(3):
        for name, llm in engines.items():
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            dt = time.perf_counter() - t
            rates[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
    for name, r in rates.items():
        print(f"{name:6s} " + " / ".join(f"{x:.1f}" for x in r) + " tok/s")
    st = engines["ngram"].llm_engine.speculator.stats
    print(f"ngram drafted {st.num_draft_tokens} tokens, accepted {st.num_accepted_tokens}")


if __name__ == "__main__":
    main()
