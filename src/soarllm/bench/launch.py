"""Servers the benchmark starts itself, and the Ease figures only such a server can give.

* time to ready: process start -> ``GET /v1/models`` answers 200;
* time to first token: process start -> the first token chunk of a first streamed request;
* peak resident memory: the highest sum of RSS over the process and all its descendants, sampled
  every ``interval_s`` from the start until the server is stopped.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from soarllm.bench.client import Endpoint, first_model
from soarllm.errors import SoarError

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class EaseMetrics:
    command: str
    time_to_ready_s: float | None = None
    time_to_first_token_s: float | None = None
    peak_rss_mb: float | None = None  # over the whole life of the server, benchmark included
    startup_peak_rss_mb: float | None = None  # up to the first token


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            text = (task / "children").read_text()
            kids.extend(int(x) for x in text.split())
    except OSError:
        pass
    return kids


def tree_rss_bytes(pid: int) -> int | None:
    """Resident bytes of a process and all its descendants (Linux /proc; psutil elsewhere)."""
    if not Path("/proc").is_dir():
        try:
            import psutil
        except ImportError:
            return None
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs)
        except psutil.Error:
            return None
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            continue
        stack.extend(_children(p))
    return total


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, interval_s: float):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.peak = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            rss = tree_rss_bytes(self.pid)
            if rss:
                self.peak = max(self.peak, rss)
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=2)


class LaunchedServer:
    """Start ``command``, wait until ``endpoint`` serves a first token, stop it on exit."""

    def __init__(
        self,
        command: str,
        endpoint: Endpoint,
        log_path: Path | None = None,  # the server's stdout and stderr (a temp file if None)
        ready_timeout_s: float = 900.0,
        interval_s: float = 0.1,
    ):
        self.command, self.endpoint = command, endpoint
        if log_path is None:  # keep the output anyway: it explains a server that fails to start
            import tempfile

            log_path = Path(tempfile.mkstemp(prefix="soar-launch-", suffix=".log")[1])
        self.log_path, self.ready_timeout_s, self.interval_s = log_path, ready_timeout_s, interval_s
        self.ease = EaseMetrics(command=command)
        self._proc: subprocess.Popen[bytes] | None = None
        self._sampler: _RssSampler | None = None

    def __enter__(self) -> LaunchedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> EaseMetrics:
        log = open(self.log_path, "wb")  # noqa: SIM115
        t0 = time.perf_counter()
        self._proc = subprocess.Popen(
            shlex.split(self.command), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()  # the child holds its own descriptor
        self._sampler = _RssSampler(self._proc.pid, self.interval_s)
        self._sampler.start()
        try:
            self.ease.time_to_ready_s = self._wait_ready(t0)
            self.ease.time_to_first_token_s = self._first_token(t0)
        except BaseException:
            self.stop()
            raise
        self.ease.startup_peak_rss_mb = self._sampler.peak / 2**20
        return self.ease

    @property
    def pid(self) -> int | None:
        """The launched process (the root of the tree whose memory is sampled)."""
        return self._proc.pid if self._proc is not None else None

    def _check_alive(self) -> None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            tail = Path(self.log_path).read_text(errors="replace")[-2000:]
            raise SoarError(
                f"the launched server exited with code {self._proc.returncode} before it was "
                f"ready: {self.command!r}\n{tail}"
            )

    def _wait_ready(self, t0: float) -> float:
        url = f"{self.endpoint.url}/v1/models"
        while time.perf_counter() - t0 < self.ready_timeout_s:
            self._check_alive()
            try:
                if httpx.get(url, timeout=2.0, headers=self.endpoint.headers).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SoarError(
            f"the launched server did not answer {url} within {self.ready_timeout_s:g} s"
        )

    def _first_token(self, t0: float) -> float:
        import asyncio

        from soarllm.bench.client import send_request
        from soarllm.bench.workloads import SampleRequest

        async def probe() -> float:
            async with httpx.AsyncClient(timeout=self.ready_timeout_s) as client:
                model = await first_model(client, self.endpoint)
                prompt = "Hello" if self.endpoint.api == "completions" else [
                    {"role": "user", "content": "Hello"}
                ]
                result = await send_request(
                    client, self.endpoint, SampleRequest(prompt, 1, 4, "probe"), model
                )
            if not result.success:
                raise SoarError(f"the launched server failed its first request: {result.error}")
            return result.start_time + result.ttft - t0

        return asyncio.run(probe())

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGTERM)
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=5)
            except ProcessLookupError:
                pass
        if self._sampler is not None:
            self._sampler.stop()
            self.ease.peak_rss_mb = self._sampler.peak / 2**20
            self._sampler = None
