"""Shared fixtures. The real default model is pulled once into SOARLLM_HOME (CI pulls it before
the tests; a developer's cache is reused)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Engines run eagerly in the suite (and in the servers it starts, which inherit the environment):
# compiling every tiny engine would take minutes. tests/model/test_compile.py compiles on purpose.
os.environ.setdefault("SOARLLM_ENFORCE_EAGER", "1")

# Property-based tests (hypothesis, schemathesis) draw fresh examples on a developer's machine, where
# a new failure is a find; in CI (CI=true) they replay a fixed derivation per test, so a submission
# never fails on an example nobody saw before.
if os.environ.get("CI"):
    from hypothesis import settings as _hypothesis_settings

    _hypothesis_settings.register_profile("ci", derandomize=True, database=None)
    _hypothesis_settings.load_profile("ci")

DEFAULT_MODEL = "smollm2-135m-instruct"

# Skip reasons that are outside the project's control on a machine without an accelerator, or
# with a CPU that lacks an instruction set a native kernel needs.
_HARDWARE_SKIPS = ("gpu", "cuda", "accelerator", "avx-512", "avx2")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--strict-skips", action="store_true",
        help="fail the run if a test is skipped for any reason other than missing GPU hardware",
    )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--strict-skips"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    bad = []
    for rep in skipped:
        reason = str(rep.longrepr[2] if isinstance(rep.longrepr, tuple) else rep.longrepr)
        if not any(h in reason.lower() for h in _HARDWARE_SKIPS):
            bad.append((rep.nodeid, reason))
    if bad:
        print(f"\n--strict-skips: {len(bad)} test(s) skipped for a reason other than missing GPU:")
        for nodeid, reason in bad:
            print(f"  {nodeid}: {reason}")
        if session.exitstatus == 0:
            session.exitstatus = 1


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint (tests/cli and tests/eval shadow it with their own)."""
    from tests.tiny import make_tiny_model

    # a long context so that a stream can outlast the shutdown test's timeout
    return make_tiny_model(tmp_path_factory.mktemp("serve-tiny-llama"), "llama",
                           max_position_embeddings=4096)


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory):
    """A real ``soar serve`` over tiny_model_dir, one for the session (starting one takes 5-10 s
    on two cores): tests/serve and tests/structured send it requests and read answers, none
    stops it or asserts on counters another module's requests would move."""
    from tests.serve.conftest import start_soar_serve

    log = tmp_path_factory.mktemp("tiny-serve") / "server.log"
    srv = start_soar_serve(str(tiny_model_dir), "--max-num-seqs", "256", "--no-access-log",
                           "--served-model-name", "tiny", log_path=log)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """Path of the default model's GGUF file (pulled on first use)."""
    from soarllm import hub

    return Path(hub.pull(DEFAULT_MODEL, progress=False))
