import sys, time
sys.path.insert(0, "benchmarks")
from spec_decode import workloads
from soarllm import LLM, SamplingParams
common = dict(enable_prefix_caching=False, max_model_len=2048)
eng = {"ngram": LLM("smollm2-135m-instruct", **common, speculative_config={"method": "ngram", "num_speculative_tokens": 4}),
       "none": LLM("smollm2-135m-instruct", **common),
       "none2": LLM("smollm2-135m-instruct", **common)}
tok = eng["none"].get_tokenizer()
w = workloads(32)["open_chat"]
prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m, _, _ in w]
p = SamplingParams(temperature=0, max_tokens=128)
res = {k: [] for k in eng}
for _ in range(3):
    for name, llm in eng.items():
        t = time.perf_counter(); outs = llm.generate(prompts, p); dt = time.perf_counter() - t
        res[name].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
print({k: [round(x, 1) for x in v] for k, v in res.items()})
