"""Worker processes started before their executor (multiproc.prestart_workers, used by `soar
serve`): adopted by an executor built with the same arguments, stopped otherwise, and not started
for a model that must first be pulled or converted."""

from __future__ import annotations

import dataclasses

from soarllm import SamplingParams
from soarllm.config import EngineArgs
from soarllm.distributed import multiproc
from soarllm.engine.llm_engine import LLMEngine


def _args(model) -> EngineArgs:
    return EngineArgs(model=str(model), dtype="float32", kv_cache_memory="32MiB",
                      distributed_executor_backend="mp")


def test_the_executor_adopts_workers_started_for_its_arguments(tiny_gqa_dir):
    args = _args(tiny_gqa_dir)
    assert multiproc.prestart_workers(args)
    started = [p.pid for p in multiproc._prestarted[1]]
    engine = LLMEngine(args)
    try:
        assert engine.executor.worker_pids == started
        assert multiproc._prestarted is None
        engine.add_request("r", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=3))
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert len(outs[-1].outputs[0].token_ids) == 3
    finally:
        engine.shutdown()


def test_workers_started_for_other_arguments_are_stopped(tiny_gqa_dir):
    args = _args(tiny_gqa_dir)
    assert multiproc.prestart_workers(dataclasses.replace(args, max_num_seqs=4))
    stale = list(multiproc._prestarted[1])
    engine = LLMEngine(args)
    try:
        assert not any(p.is_alive() for p in stale)
        assert set(engine.executor.worker_pids).isdisjoint(p.pid for p in stale)
    finally:
        engine.shutdown()


def test_a_gguf_not_converted_yet_is_left_to_the_engine(tmp_path, monkeypatch, tiny_model_dir):
    # the engine converts a GGUF once before its workers read it: no worker may race it
    from soarllm.hub import ready_to_load
    from soarllm.model.loader import load_checkpoint
    from tests.model.test_loader import write_tiny_gguf

    monkeypatch.setenv("SOARLLM_HOME", str(tmp_path / "home"))
    gguf = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    assert not ready_to_load(gguf)
    assert not multiproc.prestart_workers(_args(gguf))
    assert multiproc._prestarted is None
    load_checkpoint(gguf)  # converts it
    assert ready_to_load(gguf)
    assert ready_to_load(tiny_model_dir)
    assert not ready_to_load(tmp_path / "missing.gguf")
