"""`soar pull NAME`: install a registry model into the user cache ($SOARLLM_HOME)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "pull", help="download a model from the registry into the user cache",
        description="Install a registry model into $SOARLLM_HOME (default ~/.cache/soarllm) and "
        "convert it once, so that its first load is fast. --list shows each model's type (base "
        "or instruct) and its chat template.",
    )
    p.add_argument("name", nargs="?", help="registry name (see --list)")
    p.add_argument("--list", action="store_true",
                   help="list the registry's models: type, chat template, pulled or not")
    p.set_defaults(func=run)


def run(args) -> int:
    from soarllm import hub

    if args.list or not args.name:
        print(hub.registry_table())
        return 0
    path = hub.pull(args.name)
    from soarllm.model.loader.gguf_cache import ensure_converted

    ensure_converted(path)  # once, here, so that the first load does not pay for it
    print(path)
    return 0
