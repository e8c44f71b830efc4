"""Grammar masks on a hand-written tiny vocabulary (tests/structured/conftest.py): after a given
prefix of tokens, the set of tokens the packed bitmask allows is exactly the set worked out by
hand from the constraint's meaning (regex, choice, JSON, Lark and GBNF grammars): the tokens
after which the output can still be completed to a string the constraint accepts, and the end
token exactly when the output is already such a string."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from soarllm.sampling_params import SamplingParams
from soarllm.sampling_params import StructuredOutputParams as SO
from soarllm.scheduler_output import SchedulerOutput
from soarllm.structured_output import StructuredOutputManager
from tests.structured.conftest import EOS, VOCAB, tok

EXTRA = 7  # the logits are wider than the vocabulary (padded LM head): those ids are never allowed

OBJ_A = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
         "additionalProperties": False}
WS = {" ", "\n"}


@pytest.fixture
def manager(tiny_vocab) -> StructuredOutputManager:
    return StructuredOutputManager(tiny_vocab, len(VOCAB) + EXTRA, [EOS])


def decoding(rid: str, computed: int = 4, known: int = 5) -> SimpleNamespace:
    """What fill_bitmask reads of an engine Request."""
    return SimpleNamespace(request_id=rid, num_computed_tokens=computed, num_tokens=known)


def allowed_after(manager: StructuredOutputManager, so: SO, prefix: list[str]) -> set[str]:
    """The token texts the step message's bitmask allows after ``prefix``."""
    manager.add_requests(["r"], SamplingParams(structured_outputs=so))
    for t in tok(*prefix):
        manager.accept_token("r", t)
    step = SchedulerOutput(num_scheduled_tokens={"r": 1})
    manager.fill_bitmask(step, [decoding("r")])
    assert step.grammar_req_ids == ["r"]
    # bit j of int32 word w is token 32 * w + j (little-endian words)
    bits = np.unpackbits(step.grammar_bitmask.view(np.uint8), bitorder="little")
    ids = np.nonzero(bits)[0]
    assert ids.max() < len(VOCAB)  # padded ids are never allowed
    return {VOCAB[i] for i in ids}


CASES = [
    # regex: a+b
    (SO(regex="a+b"), [], {"a", "aa", "ab"}),
    (SO(regex="a+b"), ["a"], {"a", "aa", "ab", "b"}),
    (SO(regex="a+b"), ["ab"], {"<eos>"}),  # complete: only the end
    (SO(regex="a+"), ["a"], {"a", "aa", "<eos>"}),  # may end or go on
    (SO(regex="[ab]c"), [], {"a", "b"}),
    # choice
    (SO(choice=["ab", "ba", "c"]), [], {"a", "ab", "b", "ba", "c"}),
    (SO(choice=["ab", "ba", "c"]), ["b"], {"a"}),
    (SO(choice=["ab", "ba", "c"]), ["c"], {"<eos>"}),
    # JSON schema
    (SO(json={"type": "boolean"}), [], {"tr", "true", "fa", "false"}),
    (SO(json={"type": "boolean"}), ["tr"], {"ue"}),
    (SO(json={"type": "boolean"}), ["fa"], {"lse"}),
    (SO(json={"type": "boolean"}), ["true"], {"<eos>"}),
    (SO(json=OBJ_A), [], {"{"}),
    (SO(json=OBJ_A), ["{"], {'"'} | WS),
    (SO(json=OBJ_A), ["{", '"'], {"a"}),  # the only key allowed
    (SO(json=OBJ_A), ["{", '"', "a", '"'], {":"} | WS),
    (SO(json=OBJ_A), ["{", '"', "a", '"', ":"], {"1", "12", "0", "-"} | WS),
    (SO(json=OBJ_A), ["{", '"', "a", '"', ":", "1"], {"1", "12", "0", "}"} | WS),
    (SO(json=OBJ_A), ["{", '"', "a", '"', ":", "0"], {"}"} | WS),  # no leading zeros
    (SO(json=OBJ_A), ["{", '"', "a", '"', ":", "-"], {"1", "12", "0"}),
    (SO(json=OBJ_A), ["{", '"', "a", '"', ":", "12", "}"], {"<eos>"}),
    (SO(json='{"enum": ["ab", 1]}'), [], {'"', "1"}),  # not "12": 12 is not in the enum
    # Forced text (only one continuation is possible) is allowed only as the tokenizer itself
    # splits it (llguidance's rule, so outputs stay canonically tokenized): "ab", not "a" + "b".
    (SO(json='{"enum": ["ab", 1]}'), ['"'], {"ab"}),
    (SO(regex="abc"), [], {"ab"}),
    # Lark and GBNF grammars
    (SO(grammar='start: "a" ("b" | "c")'), [], {"a", "ab"}),
    (SO(grammar='start: "a" ("b" | "c")'), ["a"], {"b", "c"}),
    (SO(grammar='root ::= "x" "c"?'), ["x"], {"c", "<eos>"}),
    (SO(grammar='root ::= "x" "c"?'), [], {"x"}),
]


@pytest.mark.parametrize("so, prefix, want", CASES,
                         ids=[f"{so.kind}-{i}" for i, (so, _, _) in enumerate(CASES)])
def test_mask_is_the_hand_written_allowed_set(manager, so, prefix, want):
    assert allowed_after(manager, so, prefix) == want


def test_json_whitespace_between_tokens_is_bounded(manager):
    """At most 32 whitespace characters between two tokens of a JSON document: a model cannot
    pad a document forever."""
    prefix = ["{"] + [" "] * 32
    assert allowed_after(manager, SO(json=OBJ_A), prefix) == {'"'}
    assert allowed_after(manager, SO(json=OBJ_A), prefix[:-1]) == {'"'} | WS


def test_any_json_object(manager):
    assert allowed_after(manager, SO(json_object=True), []) == {"{"}
    assert allowed_after(manager, SO(json_object=True), ["{", "}"]) == {"<eos>"}
