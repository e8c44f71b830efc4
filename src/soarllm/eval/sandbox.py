"""Run untrusted generated code: a separate Python process, a time limit, a memory limit, no
network (the socket module refuses to connect), an empty working directory and environment.

This is a guard against accidents (an infinite loop, a runaway allocation, a stray download),
not a security boundary against hostile code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PRELUDE = '''\
import resource, socket, sys
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in soar eval")
class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _no_network()
socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "getaddrinfo"):
    setattr(socket, _name, _no_network)
try:
    resource.setrlimit(resource.RLIMIT_AS, ({mem}, {mem}))
except (ValueError, OSError):
    pass
del _name, resource
'''


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # "passed" | "failed" | "timeout"
    detail: str = ""


def run_program(program: str, timeout_s: float = 10.0, memory_mib: int = 2048) -> ExecResult:
    prelude = _PRELUDE.format(mem=memory_mib * 2**20)
    with tempfile.TemporaryDirectory(prefix="soar-eval-") as cwd:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": cwd, "PYTHONHASHSEED": "0",
               "no_proxy": "*"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", prelude + program],
            cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return ExecResult(False, "timeout", f"exceeded {timeout_s:g} s")
    if proc.returncode == 0:
        return ExecResult(True, "passed")
    lines = err.decode(errors="replace").strip().splitlines()
    return ExecResult(False, "failed", lines[-1] if lines else f"exit code {proc.returncode}")
