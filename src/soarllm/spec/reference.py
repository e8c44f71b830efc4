"""Reference proposer: OpenAI's Predicted Outputs (``prediction``), the text the output is expected
to mostly repeat (a file being edited, a document being quoted).

The proposer keeps a pointer into the reference: while the output follows it, the pointer
advances and the next tokens of the reference are proposed. After a mismatch (the edit) it
re-synchronises by finding the output's last few tokens in the reference, preferring the first
place at or after the old pointer, and goes on from there.
"""

from __future__ import annotations

import numpy as np

from soarllm.engine.request import Request
from soarllm.spec.proposer import Proposer

_RESYNC_MAX = 8  # longest output suffix used to find our place again
_RESYNC_MIN = 2  # shorter suffixes match too often by chance


class _Alignment:
    def __init__(self, reference: list[int]):
        self.ref = np.asarray(reference, dtype=np.int64)
        self.pos: int | None = 0  # index in ref of the next expected output token
        self.last_pos = 0  # where the pointer was when alignment was last known
        self.seen = 0  # output tokens already followed


class ReferenceProposer(Proposer):
    name = "reference"

    def __init__(self) -> None:
        self._state: dict[str, _Alignment] = {}

    def propose(self, req: Request, k: int) -> list[int]:
        ref = req.prediction_token_ids
        if not ref:
            return []
        st = self._state.get(req.request_id)
        if st is None:
            st = self._state[req.request_id] = _Alignment(ref)
        out = req.output_token_ids
        for tok in out[st.seen :]:
            if st.pos is not None and st.pos < len(st.ref) and st.ref[st.pos] == tok:
                st.pos += 1
                st.last_pos = st.pos
            else:
                st.pos = None
        st.seen = len(out)
        if st.pos is None:
            st.pos = self._resync(st, out)
            if st.pos is None:
                return []
            st.last_pos = st.pos
        return st.ref[st.pos : st.pos + k].tolist()

    @staticmethod
    def _resync(st: _Alignment, out: list[int]) -> int | None:
        ref = st.ref
        for n in range(min(_RESYNC_MAX, len(out)), _RESYNC_MIN - 1, -1):
            suffix = np.asarray(out[-n:], dtype=np.int64)
            if n > len(ref):
                continue
            windows = np.lib.stride_tricks.sliding_window_view(ref, n)
            hits = np.flatnonzero((windows == suffix).all(axis=1))
            if len(hits):
                after = hits[hits >= st.last_pos - n]
                start = int(after[0] if len(after) else hits[-1])
                return start + n
        return None

    def forget(self, request_id: str) -> None:
        self._state.pop(request_id, None)
