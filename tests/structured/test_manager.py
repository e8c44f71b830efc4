"""The engine's side of structured output over the hand-written vocabulary: which requests get a
bitmask row in the step message, how matchers advance and end, the compile cache, and the errors a
constraint the grammar engine cannot enforce gets (they name what is unsupported)."""

from __future__ import annotations

import numpy as np
import pytest

from soarllm.errors import InvalidRequestError
from soarllm.sampling_params import SamplingParams
from soarllm.sampling_params import StructuredOutputParams as SO
from soarllm.scheduler_output import SchedulerOutput
from soarllm.structured_output import StructuredOutputManager, check_structured_output
from soarllm.structured_output.manager import GrammarViolationError
from tests.structured.conftest import EOS, VOCAB, tok
from tests.structured.test_grammar_masks import decoding


@pytest.fixture
def manager(tiny_vocab) -> StructuredOutputManager:
    return StructuredOutputManager(tiny_vocab, len(VOCAB), [EOS])


def _params(**kw) -> SamplingParams:
    return SamplingParams(structured_outputs=SO(**kw))


def test_rows_only_for_grammar_requests_that_sample(manager):
    manager.add_requests(["g1"], _params(regex="a+b"))
    manager.add_requests(["g2"], _params(choice=["c"]))
    manager.add_requests(["g3"], _params(regex="b"))
    step = SchedulerOutput(num_scheduled_tokens={"free": 1, "g2": 1, "g3": 8, "g1": 1})
    scheduled = [decoding("free"), decoding("g2"),
                 decoding("g3", computed=0, known=20),  # a prompt chunk that ends mid-prompt
                 decoding("g1")]
    manager.fill_bitmask(step, scheduled)
    assert step.grammar_req_ids == ["g2", "g1"]
    assert step.grammar_bitmask.dtype == np.int32
    assert step.grammar_bitmask.shape == (2, (len(VOCAB) + 31) // 32)
    g2 = np.nonzero(np.unpackbits(step.grammar_bitmask[0:1].view(np.uint8),
                                  bitorder="little"))[0]
    assert g2.tolist() == tok("c")
    # the last chunk of a prompt samples: it gets a row
    step = SchedulerOutput(num_scheduled_tokens={"g3": 20})
    manager.fill_bitmask(step, [decoding("g3", computed=0, known=20)])
    assert step.grammar_req_ids == ["g3"]
    assert step.grammar_of("g3")[1].shape == (1, 1)


def test_no_rows_without_grammar_requests(manager):
    step = SchedulerOutput(num_scheduled_tokens={"free": 1})
    manager.fill_bitmask(step, [decoding("free")])
    assert step.grammar_bitmask is None and step.grammar_req_ids == []


def test_a_grammar_request_never_verifies_drafts(manager):
    manager.add_requests(["g"], _params(regex="a+b"))
    step = SchedulerOutput(num_scheduled_tokens={"g": 3}, spec_token_ids={"g": [1, 1]})
    with pytest.raises(RuntimeError, match="must not verify drafts"):
        manager.fill_bitmask(step, [decoding("g", computed=4, known=5)])


def test_accept_token_says_when_the_grammar_is_complete(manager):
    manager.add_requests(["r"], _params(regex="a+b"))
    assert manager.accept_token("r", tok("a")[0]) is False
    assert manager.accept_token("r", tok("ab")[0]) is True
    assert manager.accept_token("free", 3) is False  # no grammar: never complete


def test_ending_with_eos_where_the_grammar_may_end(manager):
    manager.add_requests(["r"], _params(regex="a+"))
    assert manager.accept_token("r", tok("a")[0]) is False
    assert manager.accept_token("r", EOS) is True


def test_a_grammar_no_token_can_continue_stops_the_request(manager):
    # "q" is in no token of the vocabulary: the mask allows only the end, which ends the request
    manager.add_requests(["r"], _params(regex="aq"))
    assert manager.accept_token("r", tok("a")[0]) is False
    step = SchedulerOutput(num_scheduled_tokens={"r": 1})
    manager.fill_bitmask(step, [decoding("r")])
    assert np.nonzero(np.unpackbits(step.grammar_bitmask.view(np.uint8),
                                    bitorder="little"))[0].tolist() == [EOS]
    assert manager.accept_token("r", EOS) is True


def test_a_disallowed_token_is_an_error(manager):
    manager.add_requests(["r"], _params(regex="a+b"))
    with pytest.raises(GrammarViolationError):
        manager.accept_token("r", tok("c")[0])


def test_n_sequences_have_their_own_matchers(manager):
    manager.add_requests(["r#0", "r#1"], _params(choice=["ab", "ba"]))
    assert manager.accept_token("r#0", tok("ab")[0]) is True
    assert manager.accept_token("r#1", tok("b")[0]) is False
    manager.remove("r#0")
    assert not manager.has_grammar("r#0") and manager.has_grammar("r#1")


def test_compiled_once_per_grammar(manager):
    c = manager.compiler
    manager.add_requests(["a"], _params(json={"type": "boolean"}))
    manager.add_requests(["b"], _params(json='{"type": "boolean"}'))  # same schema, as text
    manager.add_requests(["c"], _params(json={"type": "integer"}))
    assert (c.num_compiled, c.num_cache_hits) == (2, 1)


def test_the_cache_is_lru(tiny_vocab):
    m = StructuredOutputManager(tiny_vocab, len(VOCAB), [EOS], cache_size=2)
    for rx in ("a", "b", "a", "c", "a", "b"):
        m.add_requests([rx], _params(regex=rx))
    # a, b compiled; a hit; c evicts b; a hit; b compiled again (evicting c)
    assert (m.compiler.num_compiled, m.compiler.num_cache_hits) == (4, 2)


UNSUPPORTED = [
    (SO(json={"type": "object", "properties": {"a": {"not": {"type": "string"}}}}), "not"),
    (SO(json={"type": "object", "if": {"required": ["a"]}, "then": {}}), "if"),
    (SO(json={"type": "string", "format": "frobnicate"}), "frobnicate"),
    (SO(json={"type": "wizard"}), "wizard"),
    (SO(json="{not json"), "JSON"),
    (SO(json="[1, 2]"), "object"),
    (SO(regex="(?=a)b"), "look-around"),
    (SO(regex="(ab"), "unclosed group"),
    (SO(grammar="start: missing_rule"), "missing_rule"),
    (SO(grammar="root ::= undefined_rule"), "undefined_rule"),
    (SO(grammar='start: "a" ('), "Expected token ')'"),
]


@pytest.mark.parametrize("so, word", UNSUPPORTED, ids=[w for _, w in UNSUPPORTED])
def test_unenforceable_constraints_are_refused_by_name(manager, so, word):
    with pytest.raises(InvalidRequestError) as e:
        manager.add_requests(["r"], SamplingParams(structured_outputs=so))
    assert word in e.value.message and "cannot be enforced" in e.value.message
    assert not manager.has_grammar("r")
    with pytest.raises(InvalidRequestError) as e:  # the HTTP layer's check says the same
        check_structured_output(so, param="guided_json")
    assert word in e.value.message and e.value.param == "guided_json"


@pytest.mark.parametrize("kw", [{}, {"regex": "a", "choice": ["a"]}, {"choice": []},
                                {"choice": ["a", ""]}, {"regex": ""}, {"json": 5}])
def test_params_take_exactly_one_well_formed_constraint(kw):
    with pytest.raises(InvalidRequestError):
        SO(**kw)
