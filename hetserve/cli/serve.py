"""``hetserve serve [MODEL_DIR]``: the OpenAI-compatible server (flags spelled as vLLM's where vLLM has them).

``--cluster FILE_OR_NAME --strategy dp|pp|pd|cronus|hetis`` serves over one worker process per instance;
``--config PLAN.yaml`` takes the deployment config ``hetserve plan`` writes (``--model DIR`` overrides its model).
"""

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
    if settings.serves_cluster:
        _print_cluster(settings, server.engine.instances)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def _print_cluster(settings: object, instances: tuple[object, ...]) -> None:
    strategy = getattr(settings, "strategy", None) or "dp"
    print(f"hetserve: {strategy} over {len(instances)} instance(s); /health lists them", flush=True)
    for i in instances:
        emu = f", emulated ({i.emulation})" if i.emulation else ""  # type: ignore[attr-defined]
        print(f"  {i.name}: {i.role} on {i.device} {list(i.device_ids)}, pid {i.pid}{emu}",  # type: ignore[attr-defined]
              flush=True)
    predicted = getattr(settings, "predicted", None)
    if predicted:
        print(f"hetserve: the planner predicted {predicted.get('goodput_rps')} req/s goodput at SLO "
              f"{predicted.get('slo')} for {predicted.get('name')!r}", flush=True)
