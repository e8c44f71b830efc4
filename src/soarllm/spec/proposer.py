"""The Proposer interface: guess the next tokens of a request, to be verified by the target model.

A proposer is deterministic given the request's tokens: the verifier treats its guesses as a
one-hot draft distribution, so acceptance needs no draft probabilities (see sample/verifier.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from soarllm.engine.request import Request


class Proposer(ABC):
    name: str
    # True when proposing runs a model (a draft): the speculator then weighs its time too
    expensive: bool = False

    @abstractmethod
    def propose(self, req: Request, k: int) -> list[int]:
        """Up to ``k`` guesses for the tokens that follow ``req.all_token_ids``."""

    def propose_batch(self, reqs: list[Request], ks: list[int]) -> list[list[int]]:
        """Guesses for several requests at once (a draft model runs them as one batch)."""
        return [self.propose(r, k) for r, k in zip(reqs, ks)]

    def tokens_behind(self, req: Request) -> int:
        """Tokens of ``req`` the proposer must compute before it can guess (a draft model's
        catch-up after a prompt or a rest); 0 for proposers that only look tokens up."""
        return 0

    def recurring_seconds(self, elapsed: float) -> float | None:
        """Of a ``propose_batch`` call that took ``elapsed`` seconds, the time that recurs every
        step (what the speculator weighs against the target's step time); a draft model leaves
        out the one-off catch-up of a prompt or of tokens made while it rested (None: the call
        measured nothing that recurs)."""
        return elapsed

    def learn(self, req: Request) -> None:  # noqa: B027 (optional hook)
        """A finished request's text (a proposer with a memory keeps it)."""

    def forget(self, request_id: str) -> None:  # noqa: B027 (optional hook; stateless: no-op)
        """Drop any per-request state (the request finished)."""
