"""`soar serve [MODEL]`: the OpenAI- and TGI-compatible HTTP server."""

from __future__ import annotations

import argparse

from soarllm.cli.engine_args import add_engine_args, engine_args_from


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve a model over HTTP (OpenAI and TGI APIs, /metrics)",
        description="Serve a model with an OpenAI-compatible (/v1/completions, "
        "/v1/chat/completions, /v1/models) and TGI-compatible (/generate, /generate_stream) API, "
        "plus /health, /metrics, /tokenize and /detokenize.",
    )
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API routes "
                   "(default: $SOARLLM_API_KEY; unset: no auth)")
    g.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model name(s) clients use (default: the model argument)")
    g.add_argument("--max-waiting", type=int, default=None,
                   help="answer 503 + Retry-After once this many requests wait in the engine")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    g.add_argument("--max-request-bytes", type=int, default=16 * 2**20,
                   help="largest request body accepted (413 above)")
    g.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error", "critical"])
    g.add_argument("--engine-threads", type=int, default=None,
                   help="torch threads of the engine (default on CPU: all cores but one, which "
                   "is left to the HTTP event loop; OMP_NUM_THREADS overrides)")
    g.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="do not write a JSON access-log line per request to stdout")
    p.set_defaults(func=run)


def server_config_from(args: argparse.Namespace):
    from soarllm.serve.config import ServerConfig

    return ServerConfig(
        host=args.host, port=args.port, api_key=args.api_key,
        served_model_names=list(args.served_model_name or []), max_waiting=args.max_waiting,
        shutdown_timeout_s=args.shutdown_timeout, max_body_bytes=args.max_request_bytes,
        log_level=args.log_level, access_log=args.access_log,
        engine_threads=args.engine_threads,
    )


def run(args: argparse.Namespace) -> int:
    from soarllm.serve.server import run_server

    return run_server(engine_args_from(args), server_config_from(args))
