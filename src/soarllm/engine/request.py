"""A request's state as the engine and scheduler see it."""

from __future__ import annotations

import enum
import time

from soarllm.outputs import RequestMetrics, TokenLogprobs
from soarllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


class Request:
    """One sequence: a prompt and the tokens generated so far.

    A request with ``n > 1`` becomes n Requests that share a parent; the first one (the leader)
    computes the prompt and the others reuse its full prompt blocks (``fork_of``).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: set[int],
        arrival_time: float | None = None,
        fork_of: Request | None = None,
        parent_id: str | None = None,
        index: int = 0,
    ):
        self.request_id = request_id
        self.parent_id = parent_id or request_id
        self.index = index
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.spec_token_ids: list[int] = []  # drafts to verify in the next step
        self.spec_layout = None  # their SpecLayout when they are not one chain (lookahead)
        # Predicted Outputs: the tokenized prediction, and how its drafted tokens fared
        self.prediction_token_ids: list[int] | None = None
        self.num_prediction_accepted = 0
        self.num_prediction_rejected = 0
        self.fork_of = fork_of
        self.stop_reason: int | str | None = None
        self.output_logprobs: list[TokenLogprobs] = []
        self.prompt_logprobs: list[TokenLogprobs | None] = []
        self.metrics = RequestMetrics(arrival_time=arrival_time or time.time())

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, {self.status.value})"
        )
