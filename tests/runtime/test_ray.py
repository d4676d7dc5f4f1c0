"""Workers as Ray actors on a local two-node Ray cluster on loopback (``ray_backend.py``). Slow: needs Ray
(``pip install 'hetserve[ray]'``) and ~1 minute; skipped unless asked for::

    python -m pytest -m slow tests/runtime/test_ray.py        # or HETSERVE_RUN_SLOW=1 python -m pytest ...

The fixture runs ``ray start --head --port P --resources '{"hetserve_node_a": 1}'`` and a second
``ray start --address 127.0.0.1:P --resources '{"hetserve_node_b": 1}'`` (the ``ray`` next to this Python), and
``ray stop`` afterwards, which stops every Ray process of this user on the machine. Reference: the
single-process engine's greedy tokens.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetserve.core.sampling_params import SamplingParams
from hetserve.llm import LLM
from tests.runtime.helpers import assert_no_leaks

if importlib.util.find_spec("ray") is None:
    pytest.skip("needs Ray: pip install 'hetserve[ray]'", allow_module_level=True)

pytestmark = pytest.mark.slow

MAX_LEN = 256
PROMPTS = [[1 + (i * 7 + j) % 500 for j in range(5 + i * 9)] for i in range(6)]
SP = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PD_CONVERT = {"block_sizes": {"decode0": 32}, "kv_layouts": {"decode0": "HND"}}


@pytest.fixture(scope="module", autouse=True)
def _only_when_asked(request: pytest.FixtureRequest) -> None:
    if "slow" not in (request.config.getoption("markexpr") or "") and not os.environ.get("HETSERVE_RUN_SLOW"):
        pytest.skip("starts a two-node Ray cluster (~1 min): run with -m slow or HETSERVE_RUN_SLOW=1")


def _ray_cli() -> str:
    near = Path(sys.executable).parent / "ray"
    return str(near) if near.exists() else (shutil.which("ray") or "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict[str, str]) -> None:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"


@pytest.fixture(scope="module")
def ray_address(_only_when_asked: None):
    cli, port = _ray_cli(), _free_port()
    # Ray 2.5x+ authenticates its RPCs with a token once one exists (~/.ray/auth_token), and a node joining with
    # `ray start --address` does not pick that up by itself: a fresh token for this cluster, in the nodes' and
    # this driver's environment, makes them agree (older Rays ignore it). Ray reads it when first imported.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in [*auth, "RAY_ADDRESS"]}
    os.environ.pop("RAY_ADDRESS", None)
    if "ray" not in sys.modules:
        os.environ.update(auth)
    import ray

    env = dict(os.environ)
    common = ["--num-cpus", "1", "--object-store-memory", str(100 << 20), "--disable-usage-stats"]
    t0 = time.monotonic()
    address = f"127.0.0.1:{port}"
    try:
        _run([cli, "start", "--head", "--port", str(port), "--node-ip-address", "127.0.0.1",
              "--include-dashboard=false", "--resources", '{"hetserve_node_a": 1}', *common], env)
        _run([cli, "start", "--address", address, "--node-ip-address", "127.0.0.1",
              "--resources", '{"hetserve_node_b": 1}', *common], env)
        ray.init(address=address, log_to_driver=False)
        deadline = time.monotonic() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2:
            assert time.monotonic() < deadline, "the second Ray node did not join"
            time.sleep(0.5)
        print(f"\nRay cluster of 2 nodes up in {time.monotonic() - t0:.1f} s")
        yield address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([cli, "stop", "--force"], check=False, env=env, capture_output=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _ray_node_of(resource: str) -> str:
    import ray

    (node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
    return node


def _cluster(model: str, strategy: str, address: str, **kw) -> LLM:
    t0 = time.monotonic()
    llm = LLM(model, cluster="ray-pair", strategy=strategy, max_model_len=MAX_LEN, num_kv_blocks=128,
              ray_address=address, **kw)
    print(f"{strategy}: {len(llm.engine.placement.processes)} Ray workers ready in {time.monotonic() - t0:.1f} s")
    return llm



def test_dp_across_two_ray_nodes(model: str, reference: list[list[int]], ray_address: str) -> None:
    import ray

    from hetserve.runtime.ray_backend import RayPlacement

    llm = _cluster(model, "dp", ray_address)
    try:
        placement = llm.engine.placement
        assert isinstance(placement, RayPlacement)
        assert placement.node_ids() == {"i0": _ray_node_of("hetserve_node_a"), "i1": _ray_node_of("hetserve_node_b")}
        pids = llm.engine.worker_pids()
        assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
        assert all(i.worker.conn.sock.family == socket.AF_INET for i in llm.engine.instances.values())
        actors = [p.actor for p in placement.processes.values()]
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()
    assert not placement.processes
    for actor in actors:  # shutdown leaves no actor (nor its process) behind
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.node_id.remote(), timeout=30)


def test_pd_across_two_ray_nodes_and_actor_death(model: str, reference: list[list[int]], ray_address: str) -> None:
    import ray

    llm = _cluster(model, "pd", ray_address, step_timeout_s=20.0, **PD_CONVERT)
    eng = llm.engine
    try:
        assert eng.placement.node_ids() == {"prefill0": _ray_node_of("hetserve_node_a"),
                                            "decode0": _ray_node_of("hetserve_node_b")}
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert eng.num_transfers_ok == len(PROMPTS) and eng.num_transfers_failed == 0
        assert_no_leaks(llm.engine)

        # the decode actor dies mid-run: its socket closes, the coordinator retries its requests on prefill0
        for i, p in enumerate(PROMPTS):
            eng.add_request(f"k{i}", p, SP)
        actor = eng.placement.processes["decode0"].actor
        done: dict[str, list[int]] = {}
        killed_at = None
        t0 = time.monotonic()
        while eng.has_unfinished_requests():
            assert time.monotonic() - t0 < 60, "the cluster hung after a Ray actor died"
            for o in eng.step():
                if killed_at is None and o.outputs[0].token_ids and eng.instances["decode0"].scheduler.running:
                    ray.kill(actor)
                    killed_at = time.monotonic()
                if o.finished:
                    assert o.outputs[0].finish_reason != "error", o.outputs[0].stop_reason
                    done[o.request_id] = o.outputs[0].token_ids
        assert killed_at is not None and not eng.instances["decode0"].alive and eng.num_retries >= 1
        print(f"actor death: all requests done {time.monotonic() - killed_at:.2f} s after ray.kill; "
              f"reason: {eng.instances['decode0'].worker.dead_reason}")
        assert [done[f"k{i}"] for i in range(len(PROMPTS))] == reference
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()


def test_pp_stages_on_two_ray_nodes(model: str, reference: list[list[int]], ray_address: str) -> None:
    """A pipeline's stages on different Ray nodes (the stages' own link is loopback TCP here)."""
    llm = _cluster(model, "pp", ray_address)
    try:
        assert llm.engine.placement.node_ids() == {"pp0.s0": _ray_node_of("hetserve_node_a"),
                                                   "pp0.s1": _ray_node_of("hetserve_node_b")}
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()
