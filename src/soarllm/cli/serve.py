"""`soar serve [MODEL]`: the OpenAI- and TGI-compatible HTTP server.

Start-up problems that do not need the model (a taken or invalid port, an unknown host, a KV cache
larger than the machine's memory, an unreadable chat template) are reported before the model
loads, in well under a second after the arguments are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import socket

from soarllm.cli.engine_args import add_engine_args, engine_args_from
from soarllm.cli.generate import add_chat_template_arg
from soarllm.errors import ConfigError


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is out of range: a port is 1..65535")
    return port


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP (OpenAI and TGI APIs, /metrics)",
        description="Serve a model with an OpenAI-compatible (/v1/completions, "
        "/v1/chat/completions, /v1/models) and TGI-compatible (/generate, /generate_stream) API, "
        "plus /health, /metrics, /tokenize and /detokenize.",
    )
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind")
    g.add_argument("--port", type=port_number, default=8000, help="TCP port to listen on")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on the API routes; repeat it for "
                   "several keys, named key-1, key-2, ... in usage reports (default: "
                   "$SOARLLM_API_KEY; no key at all: no auth)")
    g.add_argument("--api-keys-file", default=None, metavar="PATH",
                   help="more keys, one a line: NAME:KEY (usage reports and metrics show NAME, "
                   "never the key) or a bare KEY; '#' starts a comment line")
    g.add_argument("--admin-api-key", action="append", default=None, metavar="KEY",
                   help="a key that may also read every key's usage at GET /v1/usage "
                   "(named admin-1, ...); repeatable")
    g.add_argument("--rate-limit-rpm", type=positive_int, default=None, metavar="N",
                   help="at most N requests per key in any 60 s (sliding window); over it: "
                   "429 + Retry-After (default: no limit)")
    g.add_argument("--rate-limit-tpm", type=positive_int, default=None, metavar="N",
                   help="at most N tokens per key in any 60 s, counted as prompt + n x "
                   "max_tokens at admission and corrected to the tokens generated when a "
                   "request ends (default: no limit)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use (default: the model argument)")
    add_chat_template_arg(g)
    g.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   choices=["hermes", "llama3_json", "mistral"],
                   help="how the model writes tool calls: hermes (Hermes/Qwen <tool_call>), "
                   "llama3_json (Llama 3 JSON), mistral ([TOOL_CALLS]); default: found from the "
                   "chat template")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="answer 503 + Retry-After once this many requests wait in the engine "
                   "(default: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    g.add_argument("--max-request-bytes", type=int, default=16 * 2**20,
                   help="largest request body accepted (413 above)")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"],
                   help="server log level (stderr)")
    g.add_argument("--data-parallel-size", "-dp", type=positive_int, default=1, metavar="N",
                   help="N engine replicas (each with --tensor-parallel-size ranks) behind this "
                   "server; a request goes to the replica holding its longest cached prefix, "
                   "else to the least loaded one")
    g.add_argument("--engine-threads", type=int, default=None,
                   help="torch threads that run the model (default on CPU: every core, in a "
                   "worker process beside the HTTP one; with --distributed-executor-backend uni "
                   "the model runs in the server's process on all cores but one; "
                   "OMP_NUM_THREADS overrides the default)")
    g.add_argument("--load-compiled-first", action="store_true",
                   help="after a restart, load the saved compiled model step before answering "
                   "(default: answer at once with the eager model and switch to the compiled "
                   "step when a background thread has loaded it, ~2 s later)")
    g.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="do not write a JSON access-log line per request to stdout")
    g.add_argument("--public-metrics", action="store_true",
                   help="serve /metrics without the API key (for Prometheus scrapers); every "
                   "other route but /health needs the key when one is set")
    g.add_argument("--allowed-origins", nargs="+", default=None, metavar="ORIGIN",
                   help="enable CORS for these browser origins (e.g. http://localhost:3000, "
                   "or '*'); default: no CORS headers")
    g.add_argument("--default-max-tokens", type=int, default=None, metavar="N",
                   help="max_tokens of chat requests that leave it out (default: up to the "
                   "context length, as OpenAI does)")
    p.set_defaults(func=run)


def server_config_from(args: argparse.Namespace):
    from soarllm.chat_utils import load_chat_template
    from soarllm.serve.config import ServerConfig

    template = getattr(args, "chat_template", None)
    api_keys = list(args.api_key or [])
    return ServerConfig(
        host=args.host, port=args.port, api_key=api_keys[0] if api_keys else None,
        more_api_keys=api_keys[1:], api_keys_file=args.api_keys_file,
        admin_api_keys=list(args.admin_api_key or []),
        rate_limit_rpm=args.rate_limit_rpm, rate_limit_tpm=args.rate_limit_tpm,
        served_model_names=list(args.served_model_name or []), max_waiting=args.max_waiting,
        shutdown_timeout_s=args.shutdown_timeout, max_body_bytes=args.max_request_bytes,
        log_level=args.log_level, access_log=args.access_log,
        engine_threads=args.engine_threads, public_metrics=args.public_metrics,
        data_parallel_size=args.data_parallel_size,
        allowed_origins=list(args.allowed_origins or []),
        default_max_tokens=args.default_max_tokens,
        chat_template=load_chat_template(template) if template is not None else None,
        tool_call_parser=getattr(args, "tool_call_parser", None),
    )


def check_port(host: str, port: int) -> None:
    """Bind host:port once, as the server will, and say what to change if that fails."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} cannot be resolved ({e.strerror}); give an address "
                          "of this machine, e.g. 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is already in use (another server is listening "
                    f"there); choose a free one with --port, or stop that server "
                    f"(`ss -ltnp 'sport = :{port}'` shows which process holds it)"
                ) from None
            if e.errno == errno.EACCES:
                raise ConfigError(f"no permission to listen on port {port}; ports below 1024 "
                                  "need root: use --port 8000 or another above 1023") from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise ConfigError(f"--host {host} is not an address of this machine; use "
                                  "127.0.0.1 (local) or 0.0.0.0 (all interfaces)") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def run(args: argparse.Namespace) -> int:
    check_port(args.host, args.port)
    config = server_config_from(args)
    config.api_keys()  # an unreadable keys file or a repeated key fails before the model loads
    engine_args = dataclasses.replace(engine_args_from(args),
                                      load_compiled_in_background=not args.load_compiled_first)
    from soarllm.serve.server import run_server

    return run_server(engine_args, config)
