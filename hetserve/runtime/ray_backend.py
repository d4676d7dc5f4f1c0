"""Workers on Ray nodes (``placement: ray`` in a cluster file, or ``from_cluster(..., backend="ray")``).

Each instance's worker runs in a Ray actor placed on the Ray node that offers the custom resource
``hetserve_node_<cluster node name>`` (start each Ray node with ``--resources '{"hetserve_node_a": 1}'``; every
actor takes a sliver of it, so one Ray node holds all the devices of its cluster node). The actor runs the
worker loop in its own process and dials the coordinator's TCP ``Listener`` (``connect.py``): the same messages,
the same ``WorkerHandle``, and the same KV paths as local workers. Actor death is worker death: its process
ends, the socket closes, and the coordinator's dead-worker handling takes over (EOF on the next read, or the
actor's task reported finished by ``RayProcess.is_alive``).

``import ray`` happens only here, when a Ray placement is made (``pip install 'hetserve[ray]'``). The model path
must exist on every Ray node (a shared file system, or the same path on each), and hetserve must be importable
in the nodes' Python.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec

from hetserve.core.errors import ValidationError
from hetserve.runtime.connect import Listener, connect_to_coordinator
from hetserve.runtime.worker import Channel, WorkerSpec, encode_msg

RESOURCE_PREFIX = "hetserve_node_"


def node_resource(node: str) -> str:
    """The Ray custom resource that marks the Ray node standing for cluster node ``node``."""
    return f"{RESOURCE_PREFIX}{node}"


class _WorkerActor:
    """One worker in the actor's own process. ``run`` blocks for the worker's life (until Shutdown or EOF)."""

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, address: str, token: str, connect_timeout_s: float) -> int:
        from hetserve.runtime.worker import _worker_main

        _worker_main(connect_to_coordinator(address, token, connect_timeout_s))
        return 0


class RayProcess:
    """The process calls ``WorkerHandle`` makes, over an actor: alive while its ``run`` task has not finished."""

    _CHECK_EVERY_S = 0.25  # is_alive runs every engine step; ask Ray at most this often

    def __init__(self, ray: Any, actor: Any, run_ref: Any, node_ref: Any) -> None:
        self._ray, self.actor, self.run_ref, self.node_ref = ray, actor, run_ref, node_ref
        self.pid: int | None = None  # the worker's pid on its node, from its hello
        self.error: str | None = None
        self._done = False
        self._checked_s = 0.0

    def _poll(self, timeout_s: float) -> None:
        if self._done:
            return
        ready, _ = self._ray.wait([self.run_ref], timeout=max(0.0, timeout_s))
        self._checked_s = time.monotonic()
        if ready:
            self._done = True
            try:
                self._ray.get(self.run_ref, timeout=0)
            except Exception as e:  # noqa: BLE001 - ActorDiedError and friends: the worker is gone either way
                self.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            self.kill()  # a finished worker's actor holds a process and a resource sliver: free them

    def is_alive(self) -> bool:
        if not self._done and time.monotonic() - self._checked_s >= self._CHECK_EVERY_S:
            self._poll(0.0)
        return not self._done

    @property
    def exitcode(self) -> int | None:
        if not self._done:
            return None
        return 0 if self.error is None else 1

    def join(self, timeout_s: float | None = None) -> None:
        self._poll(30.0 if timeout_s is None else timeout_s)

    def terminate(self) -> None:
        self.kill()

    def kill(self) -> None:
        try:
            self._ray.kill(self.actor, no_restart=True)
        except Exception:  # noqa: BLE001, S110 - already gone
            pass
        if not self._done:
            self._poll(5.0)


class RayPlacement:
    """Ray actors as workers. ``nodes`` maps instance name -> cluster node name.

    ``address``: a running Ray cluster (``"auto"``, ``"HOST:PORT"``, ``"ray://..."``); None uses ``$RAY_ADDRESS``
    or else starts a private local Ray whose one node offers every cluster node's resource (a quick try on one
    machine). ``listen_host``: where the coordinator listens (``0.0.0.0`` for workers on other machines; they
    are told this node's Ray IP). ``num_cpus`` / ``num_gpus``: what each worker actor reserves.
    """

    def __init__(self, nodes: dict[str, str], *, address: str | None = None, listen_host: str = "127.0.0.1",
                 listen_port: int = 0, advertise_host: str | None = None, num_cpus: float = 0.0,
                 num_gpus: float = 0.0, resource_per_worker: float = 0.001, connect_timeout_s: float = 60.0,
                 init_kwargs: dict[str, Any] | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise ValidationError("backend", "backend 'ray' needs Ray: pip install 'hetserve[ray]'") from None
        self._ray = ray
        self.nodes = dict(nodes)
        self.processes: dict[str, RayProcess] = {}
        self.listener: Listener | None = None
        self._owns_ray = False
        if not ray.is_initialized():
            kw = dict(init_kwargs or {})
            if address is None and not os.environ.get("RAY_ADDRESS"):
                kw.setdefault("include_dashboard", False)
                kw.setdefault("resources", {node_resource(n): 1.0 for n in set(nodes.values())})
                ray.init(address="local", **kw)
            else:
                ray.init(address=address, **kw)
            self._owns_ray = True
        have = ray.cluster_resources()
        missing = sorted({n for n in nodes.values() if have.get(node_resource(n), 0.0) < resource_per_worker})
        if missing:
            self.close()
            first = node_resource(missing[0])
            raise ValidationError(
                "placement", f"no Ray node offers {', '.join(node_resource(n) for n in missing)}; start the Ray node "
                             f"for cluster node {missing[0]!r} with `ray start ... --resources '{{\"{first}\": 1}}'`")
        if advertise_host is None and listen_host in ("0.0.0.0", "::", ""):
            advertise_host = ray.util.get_node_ip_address()
        self.listener = Listener(listen_host, listen_port, advertise_host=advertise_host)
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.resource_per_worker = resource_per_worker
        self.connect_timeout_s = connect_timeout_s
        self._actor_cls = ray.remote(max_restarts=0, max_task_retries=0)(_WorkerActor)

    def launch(self, spec: WorkerSpec) -> RayProcess:
        if spec.name not in self.nodes:
            raise ValidationError("instances", f"instance {spec.name!r} has no cluster node; known: "
                                               f"{', '.join(self.nodes)}")
        num_gpus = self.num_gpus
        if getattr(spec, "device", "cpu").startswith("cuda"):
            # Ray picks the GPU and sets CUDA_VISIBLE_DEVICES: the worker's GPU is its first visible one.
            # Emulated partitions of one GPU share it: ray_options={"num_gpus": 0.5} or smaller.
            num_gpus = num_gpus or 1.0
            spec = msgspec.structs.replace(spec, device="cuda")
        assert self.listener is not None
        token = self.listener.expect(spec.name, encode_msg(spec))
        actor = self._actor_cls.options(
            num_cpus=self.num_cpus, num_gpus=num_gpus,
            resources={node_resource(self.nodes[spec.name]): self.resource_per_worker},
        ).remote()
        node_ref = actor.node_id.remote()  # queued before run, which then holds the actor for the worker's life
        proc = RayProcess(self._ray, actor, actor.run.remote(self.listener.address, token, self.connect_timeout_s),
                          node_ref)
        self.processes[spec.name] = proc
        return proc

    def connect(self, spec: WorkerSpec, process: Any, timeout_s: float) -> Channel:
        assert self.listener is not None
        chan, hello = self.listener.accept(spec.name, timeout_s, process.is_alive)
        process.pid = hello.pid
        return chan

    def node_ids(self) -> dict[str, str]:
        """Instance name -> the Ray node id its actor runs on."""
        return {n: self._ray.get(p.node_ref, timeout=30) for n, p in self.processes.items()}

    def close(self) -> None:
        for p in self.processes.values():
            p.kill()
        self.processes.clear()
        if self.listener is not None:
            self.listener.close()
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False
