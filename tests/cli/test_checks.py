"""Checks that run before a model loads: KV cache memory, chat templates, base models; and what
`soar pull --list` says about each registry model."""

from __future__ import annotations

import psutil
import pytest

from soarllm import hub
from soarllm.chat_utils import load_chat_template
from soarllm.cli.main import build_parser
from soarllm.errors import ConfigError


def test_kv_cache_larger_than_the_machine_is_refused_naming_the_available_memory():
    from soarllm.cli.engine_args import engine_args_from

    args = build_parser().parse_args(["serve", "m", "--device", "cpu", "--kv-cache-memory",
                                      "500TiB"])
    with pytest.raises(ConfigError) as err:
        engine_args_from(args)
    message = err.value.message
    assert "500TiB" in message and "available on cpu" in message
    stated = float(message.split(" GiB of memory available")[0].rsplit(" ", 1)[-1])
    assert stated == pytest.approx(psutil.virtual_memory().available / 2**30, rel=0.2)
    # fractions and sizes that fit pass
    for ok in ("0.5", "1MiB"):
        ea = engine_args_from(build_parser().parse_args(["serve", "--device", "cpu",
                                                         "--kv-cache-memory", ok]))
        assert ea.kv_cache_memory == ok


def test_chat_template_from_a_file_or_inline(tmp_path):
    text = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(text)
    assert load_chat_template(str(path)) == text
    assert load_chat_template(text) == text
    with pytest.raises(ConfigError, match="neither a file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    with pytest.raises(ConfigError, match="syntax error"):
        load_chat_template("{% for m in messages %}{{ m }}")


def test_chat_refuses_a_base_model_before_loading_it(tmp_path):
    from soarllm.cli.chat import chat_template_for

    base = next(e for e in hub.REGISTRY if not e.instruct)
    args = build_parser().parse_args(["chat", base.name])
    with pytest.raises(ConfigError, match="base model") as err:
        chat_template_for(args)
    assert f"soar generate {base.name}" in err.value.message
    assert "--chat-template" in err.value.message
    # by the path of its pulled file too
    args = build_parser().parse_args(["chat", str(hub.model_path(base))])
    with pytest.raises(ConfigError, match="base model"):
        chat_template_for(args)
    # an explicit template is the user's choice
    args = build_parser().parse_args(["chat", base.name, "--chat-template", "{{ 'x' }}"])
    assert chat_template_for(args) == "{{ 'x' }}"
    args = build_parser().parse_args(["chat", hub.DEFAULT_MODEL])
    assert chat_template_for(args) is None


def test_a_model_without_chat_template_is_a_clear_error():
    from types import SimpleNamespace

    from soarllm.cli.chat import use_chat_template

    tok = SimpleNamespace(chat_template=None)
    with pytest.raises(ConfigError, match="no chat template") as err:
        use_chat_template(tok, None, "some-model")
    assert "--chat-template" in err.value.message
    use_chat_template(tok, "{{ 'x' }}", "some-model")
    assert tok.chat_template == "{{ 'x' }}"


def test_pull_list_shows_type_and_chat_template(capsys):
    from soarllm.cli.main import main

    assert main(["pull", "--list"]) == 0
    out = capsys.readouterr().out
    assert "TYPE" in out and "CHAT TEMPLATE" in out
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip()}
    for entry in hub.REGISTRY:
        assert f" {entry.kind} " in rows[entry.name]
    assert "gemma3-270m" in rows and " base " in rows["gemma3-270m"]
    assert " instruct " in rows[hub.DEFAULT_MODEL]


@pytest.mark.model
def test_registry_chat_template_notes_match_the_files(default_model_path):
    """What the registry says about each pulled model's chat template is what its GGUF holds: the
    key `tokenizer.chat_template` (GGUF's name) in the metadata at the head of the file."""
    pulled = [e for e in hub.REGISTRY if hub.model_path(e).is_file()]
    assert hub.registry_entry(hub.DEFAULT_MODEL) in pulled
    for entry in pulled:
        with open(hub.model_path(entry), "rb") as f:
            head = f.read(64 * 2**20)  # the metadata (vocab included) is a few MiB
        assert head.startswith(b"GGUF")
        in_file = b"tokenizer.chat_template" in head
        assert (entry.chat_template == "gguf") == in_file, entry.name
