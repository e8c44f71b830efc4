"""Real `soar` runs on a tiny model: the model positional, start-up failures before the model
loads, Ctrl-C in `soar chat`, and progress bars of the long-running commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from soarllm.cli.main import main
from soarllm.distributed.multiproc import free_port

REPO = Path(__file__).resolve().parents[2]


def soar(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soarllm.cli.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def greedy_text(model_dir: Path, prompt: str, n: int) -> str:
    """n greedy tokens from transformers (the oracle), decoded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok.encode(prompt, add_special_tokens=False)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return tok.decode(ids[-n:], skip_special_tokens=True)


@pytest.mark.slow  # end to end: starts soar processes
def test_generate_takes_the_model_positionally_or_as_a_flag(tiny_model_dir):
    want = greedy_text(tiny_model_dir, "def main(", 6)
    common = ["--max-tokens", "6", "--ignore-eos", "--max-model-len", "256"]
    positional = soar("generate", str(tiny_model_dir), "def main(", *common)
    assert positional.returncode == 0, positional.stderr
    flag = soar("generate", "def main(", "--model", str(tiny_model_dir), *common)
    assert flag.returncode == 0, flag.stderr
    assert positional.stdout == flag.stdout == want + "\n"


def _listening_socket() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s



def test_serve_on_a_taken_port_fails_before_loading_the_model(tiny_model_dir):
    with _listening_socket() as taken:
        port = taken.getsockname()[1]
        proc = soar("serve", str(tiny_model_dir), "--port", str(port), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"port {port} on 127.0.0.1 is already in use" in proc.stderr and "--port" in proc.stderr
    assert "loading" not in out and "model loaded" not in out and "Traceback" not in out


def test_serve_refuses_a_kv_cache_larger_than_the_machine_before_loading(tiny_model_dir):
    proc = soar("serve", str(tiny_model_dir), "--port", str(free_port()), "--device", "cpu",
                "--kv-cache-memory", "500TiB", timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1
    assert "GiB of memory available on cpu" in proc.stderr
    assert "loading" not in out and "model loaded" not in out and "Traceback" not in out


def test_serve_bad_port_is_a_usage_error():
    proc = soar("serve", "--port", "99999", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: soar serve ") and "1..65535" in proc.stderr


class _Reader(threading.Thread):
    def __init__(self, stream) -> None:
        super().__init__(daemon=True)
        self.stream, self.text, self.lock = stream, "", threading.Lock()
        self.start()

    def run(self) -> None:
        while chunk := os.read(self.stream.fileno(), 4096):
            with self.lock:
                self.text += chunk.decode(errors="replace")

    def wait_for(self, predicate, proc, timeout: float = 600) -> str:  # a hang guard only
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self.text):
                    return self.text
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"not seen (exit {proc.poll()}): {self.text[-2000:]!r}")


@pytest.mark.slow  # end to end: starts soar processes
def test_ctrl_c_in_chat_stops_the_reply_not_the_session(tiny_model_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "soarllm.cli.main", "chat", str(tiny_model_dir), "--max-tokens",
         "4000", "--ignore-eos", "--max-model-len", "4096"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    try:
        # The random model's replies may themselves contain "> ", so the prompt is recognised as
        # the end of the output once the reply was stopped, never by counting markers.
        prompt = out.wait_for(lambda t: t.endswith("> "), proc)
        for turn in (1, 2):
            start = len(prompt)
            proc.stdin.write(f"message {turn}\n".encode())
            proc.stdin.flush()
            # the reply has begun: at least 10 characters after the prompt
            before = len(out.wait_for(lambda t, s=start: len(t) >= s + 10, proc))
            proc.send_signal(signal.SIGINT)
            err.wait_for(lambda t, n=turn: t.count("[reply stopped]") == n, proc)
            # back at the prompt, alive, the reply cut short
            prompt = out.wait_for(lambda t: t.endswith("\n> "), proc)
            assert proc.poll() is None
            assert len(prompt) - before < 4000
        proc.send_signal(signal.SIGINT)  # Ctrl-C at the prompt ends the session
        try:
            rc = proc.wait(600)  # a hang guard: a loaded machine can make the exit slow
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after Ctrl-C at the prompt: {err.text[-2000:]!r}") from None
        assert rc == 0, err.text[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow  # end to end: starts soar processes
def test_bench_offline_shows_progress_to_the_last_token(tiny_model_dir, capsys):
    assert main(["bench", "offline", str(tiny_model_dir), "--max-model-len", "256",
                 "--num-prompts", "3", "--input-len", "8", "--output-len", "4",
                 "--batch-sizes", "1,2", "--repeats", "2"]) == 0
    err = capsys.readouterr().err
    # output tokens: warm-up 1x4, throughput 3x4, latency (1 + 2) x 4, twice
    total = 4 + 12 + 2 * (4 + 8)
    assert "bench offline" in err and f"{total}/{total} [" in err


@pytest.mark.slow  # end to end: starts soar processes
def test_eval_ppl_and_humaneval_show_progress(tiny_model_dir, capsys):
    assert main(["eval", "ppl", str(tiny_model_dir), "--max-model-len", "256", "--corpus",
                 "stdlib", "--max-tokens", "300", "--window", "128", "--stride", "64",
                 "--batch", "2"]) == 0
    err = capsys.readouterr().err
    windows = 1 + -(-(300 - 128) // 64)  # the first window, then one per stride to the end
    assert "perplexity stdlib" in err and f"{windows}/{windows} [" in err
    assert main(["eval", "humaneval", str(tiny_model_dir), "--max-model-len", "512", "--limit",
                 "2", "--max-new-tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert "running tests" in err and "2/2 [" in err


@pytest.mark.slow  # end to end: starts soar processes
def test_vllm_flags_run(tiny_model_dir):
    proc = soar("generate", str(tiny_model_dir), "x", "--max-tokens", "2", "--max-model-len",
                "128", "--device", "cpu", "--trust-remote-code", "--enforce-eager",
                "--gpu-memory-utilization", "0.05")
    assert proc.returncode == 0, proc.stderr
