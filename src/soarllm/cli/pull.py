"""`soar pull NAME`: install a registry model into the user cache ($SOARLLM_HOME)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("pull", help="download a model from the registry into the user cache")
    p.add_argument("name", nargs="?", help="registry name (see --list)")
    p.add_argument("--list", action="store_true", help="list the registry's models")
    p.set_defaults(func=run)


def run(args) -> int:
    from soarllm import hub

    if args.list or not args.name:
        for name, desc in hub.list_models():
            print(f"{name:28s} {desc}")
        return 0
    path = hub.pull(args.name)
    print(path)
    return 0
