"""``hetserve serve [MODEL_DIR]``: the OpenAI-compatible server (flags spelled as vLLM's where vLLM has them)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    from hetserve.server.settings import add_settings_arguments

    add_settings_arguments(p)


def run(args: argparse.Namespace) -> int:
    from hetserve.server.launch import bind_socket, make_server, resolve_model
    from hetserve.server.settings import settings_from_args

    settings = settings_from_args(args)
    sock = bind_socket(settings.host, settings.port)  # before loading the model: a busy port fails fast
    try:
        settings = resolve_model(settings)
        server, _ = make_server(settings)
    except BaseException:
        sock.close()
        raise
    host, port = sock.getsockname()[:2]
    print(f"hetserve: serving {settings.model_names[0]!r} from {settings.model} at http://{host}:{port}/v1 "
          f"(max_model_len {server.engine.max_model_len}); Ctrl+C stops", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0
