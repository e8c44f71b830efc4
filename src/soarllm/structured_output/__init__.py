"""Structured output: token masks from a grammar engine (llguidance), so that a request's output
always matches its JSON schema, regex, choice list or grammar.

- ``grammar``: ``StructuredOutputParams`` -> llguidance grammar text, and the tokenizer-free check
  the HTTP layer runs before queueing a request;
- ``compiler``: the grammar compiled against the model's tokenizer, cached per grammar (LRU);
- ``manager``: the engine's side: one matcher per request that has a grammar, advanced with every
  token the request appends; before each step, the packed bitmask of the tokens each scheduled
  request may sample next, sent to the runner in the step message.

The sampler (sample/sampler.py) applies the bitmask to the logits, batched.
"""

from soarllm.structured_output.grammar import check_structured_output, grammar_of
from soarllm.structured_output.manager import StructuredOutputManager

__all__ = ["StructuredOutputManager", "check_structured_output", "grammar_of"]
