"""`soar` argument parsing: the model positional or --model everywhere, errors with the
subcommand's usage, defaults and help on every flag, vLLM's flag names accepted or hinted."""

from __future__ import annotations

import argparse

import pytest

from soarllm.cli.main import build_parser
from soarllm.config import DEFAULT_MODEL

# Every subcommand that takes a model, with the arguments it needs besides.
MODEL_COMMANDS = {
    ("generate",): ["a prompt"],
    ("chat",): [],
    ("serve",): [],
    ("bench", "offline"): [],
    ("eval", "ppl"): [],
    ("eval", "humaneval"): [],
    ("plan",): [],
}


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def parse_error(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("command", list(MODEL_COMMANDS), ids=" ".join)
def test_model_positional_or_flag(command):
    rest = MODEL_COMMANDS[command]
    assert parse([*command, "some/model", *rest]).model == "some/model"
    assert parse([*command, *rest, "--model", "some/model"]).model == "some/model"
    assert parse([*command, "-m", "some/model", *rest]).model == "some/model"
    assert parse([*command, "some/model", *rest, "--model", "some/model"]).model == "some/model"
    assert parse([*command, *rest]).model == DEFAULT_MODEL
    assert "model_flag" not in vars(parse([*command, *rest]))


@pytest.mark.parametrize("command", list(MODEL_COMMANDS), ids=" ".join)
def test_model_given_twice_differently_is_an_error_of_the_subcommand(command, capsys):
    err = parse_error([*command, "one", *MODEL_COMMANDS[command], "--model", "two"], capsys)
    assert err.startswith(f"usage: soar {' '.join(command)} ")
    assert "given twice" in err and "'one'" in err and "'two'" in err


def test_generate_takes_the_prompt_alone_or_after_the_model():
    args = parse(["generate", "just a prompt"])
    assert (args.model, args.prompt) == (DEFAULT_MODEL, "just a prompt")
    args = parse(["generate", "m", "p", "--max-tokens", "3"])
    assert (args.model, args.prompt, args.max_tokens) == ("m", "p", 3)
    # options between the two positionals
    args = parse(["generate", "m", "--max-tokens", "3", "p"])
    assert (args.model, args.prompt, args.max_tokens) == ("m", "p", 3)
    args = parse(["generate", "--temperature", "0.5", "p", "-m", "m"])
    assert (args.model, args.prompt, args.temperature) == ("m", "p", 0.5)


@pytest.mark.parametrize("command", [*MODEL_COMMANDS, ("pull",), ("bench", "serve")],
                         ids=" ".join)
def test_a_wrong_flag_prints_the_subcommand_usage(command, capsys):
    rest = MODEL_COMMANDS.get(command, [])
    if command == ("bench", "serve"):
        rest = ["--endpoint", "http://x"]
    err = parse_error([*command, *rest, "--no-such-flag"], capsys)
    assert err.startswith(f"usage: soar {' '.join(command)} "), err
    assert f"soar {' '.join(command)}: error: unrecognized arguments: --no-such-flag" in err


def test_unknown_flags_get_a_hint(capsys):
    err = parse_error(["serve", "--pipeline-parallel-size", "2"], capsys)
    assert "--pipeline-parallel-size is vLLM's" in err and "--tensor-parallel-size only" in err
    err = parse_error(["serve", "--disable-log-requests"], capsys)
    assert "use --no-access-log" in err
    err = parse_error(["bench", "offline", "--max-num-batch-tokens=64"], capsys)
    assert "did you mean --max-num-batched-tokens?" in err
    err = parse_error(["chat", "--gpu-memory-utilisation", "0.5"], capsys)
    assert "did you mean --gpu-memory-utilization?" in err


def test_vllm_flag_names_are_accepted_or_mapped(capsys):
    args = parse(["serve", "m", "--gpu-memory-utilization", "0.4", "--trust-remote-code",
                  "--enforce-eager", "--served-model-name", "a", "b", "--chat-template", "t.jinja",
                  "--max-model-len", "128", "--max-num-seqs", "4", "--no-enable-prefix-caching"])
    assert args.kv_cache_memory == 0.4 and "gpu_memory_utilization" not in vars(args)
    assert args.trust_remote_code and args.enforce_eager
    assert args.served_model_name == ["a", "b"] and args.chat_template == "t.jinja"
    assert (args.max_model_len, args.max_num_seqs, args.enable_prefix_caching) == (128, 4, False)
    assert parse(["serve", "--enable-prefix-caching"]).enable_prefix_caching is True
    err = parse_error(["serve", "--gpu-memory-utilization", "0.4", "--kv-cache-memory", "1GiB"],
                      capsys)
    assert err.startswith("usage: soar serve ") and "give one" in err
    err = parse_error(["generate", "p", "--gpu-memory-utilization", "1.5"], capsys)
    assert "(0, 1]" in err


def test_engine_args_take_the_mapped_flags():
    from soarllm.cli.engine_args import engine_args_from

    ea = engine_args_from(parse(["chat", "m", "--gpu-memory-utilization", "0.3",
                                 "--trust-remote-code", "--device", "cpu"]))
    assert (ea.model, ea.kv_cache_memory, ea.trust_remote_code) == ("m", 0.3, True)
    assert engine_args_from(parse(["serve", "m", "-tp", "2", "--enable-expert-parallel"])
                            ).enable_expert_parallel is True
    assert engine_args_from(parse(["serve", "m"])).enable_expert_parallel is False


@pytest.mark.parametrize("port", ["0", "65536", "99999", "-1", "http"])
def test_serve_port_out_of_range_is_a_usage_error(port, capsys):
    err = parse_error(["serve", "--port", port], capsys)
    assert err.startswith("usage: soar serve ") and "argument --port" in err
    assert parse(["serve", "--port", "65535"]).port == 65535


def _leaf_parsers() -> dict[str, argparse.ArgumentParser]:
    leaves = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            leaves[" ".join(path)] = parser
        for action in subs:
            for name, child in action.choices.items():
                walk(child, (*path, name))

    walk(build_parser(), ())
    return leaves


def test_every_flag_has_help_and_help_shows_defaults():
    leaves = _leaf_parsers()
    assert {"pull", "generate", "chat", "serve", "bench serve", "bench offline", "eval ppl",
            "eval humaneval", "plan"} <= set(leaves)
    missing = [
        f"soar {name} {a.option_strings or a.dest}"
        for name, parser in leaves.items() if name != "plan"  # plan's flags belong to cli/plan.py
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()
    ]
    assert not missing
    serve = subparser("serve").format_help()
    assert "(default: 8000)" in serve and "(default: 127.0.0.1)" in serve
    assert "(default: 16)" in serve  # --block-size, from the shared engine flags
    assert "(default: None)" not in serve and "(default: False)" not in serve
    ppl = subparser("eval", "ppl").format_help()
    assert "(default: 512)" in ppl and "(default: 256)" in ppl  # --window, --stride
    gen = subparser("generate").format_help()
    assert f"default: {DEFAULT_MODEL}" in gen


def test_bench_offline_sizes_scale_to_the_device():
    from soarllm.cli.bench import OFFLINE_SIZES, fill_offline_sizes

    args = parse(["bench", "offline", "m"])
    assert args.num_prompts is None and args.batch_sizes is None
    assert set(fill_offline_sizes(args, "cpu")) == {"num_prompts", "input_len", "output_len",
                                                    "batch_sizes"}
    cpu, gpu = OFFLINE_SIZES["cpu"], OFFLINE_SIZES["cuda"]
    assert args.num_prompts == cpu["num_prompts"] and args.batch_sizes == cpu["batch_sizes"]

    def tokens(s):
        return s["num_prompts"] * (s["input_len"] + s["output_len"])

    assert tokens(cpu) * 10 <= tokens(gpu) and max(cpu["batch_sizes"]) < max(gpu["batch_sizes"])
    args = parse(["bench", "offline", "m", "--num-prompts", "3", "--batch-sizes", "2"])
    assert fill_offline_sizes(args, "cuda:0") == ["input_len", "output_len"]
    assert (args.num_prompts, args.batch_sizes, args.input_len) == (3, [2], gpu["input_len"])
