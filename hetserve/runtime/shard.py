"""Inside a worker process: its share of an instance (a pipeline stage's layers, a TP rank's kv heads) and
the KV hand-off commands on that share.

A worker of a TP group joins the group's ``torch.distributed`` process group first (gloo on CPU, NCCL on CUDA;
rendezvous through a TCP store at ``spec.tp_store``, which rank 0 hosts), then loads only its slice of the
checkpoint. A pipeline stage opens its ``StageLink`` before loading (so the previous stage can dial in) and
dials the next stage at its first step (when every worker is ready: a worker never waits for a neighbour to
start before it reports ready, whatever order the workers are launched in).

KV: the worker's cache descriptor covers its own layers (``num_layers`` = the stage's count) and its TP rank's
heads. ``ExtractKV`` converts its share into the wire format (the receiver's block size, layout and dtype) and
answers one buffer per layer with ``layer_start`` and ``head_start``; ``InsertKV`` brings the shards that cover
its layers (from one or several sender workers, joined along heads) and converts them layer by layer.
"""

from __future__ import annotations

import dataclasses
import datetime
import warnings
from typing import TYPE_CHECKING, Any

import torch

from hetserve.core.config import EngineConfig
from hetserve.core.model_config import ModelConfig
from hetserve.engine.kv_views import LayerViews
from hetserve.engine.model.parallel import ParallelSpec
from hetserve.engine.runner import ModelRunner
from hetserve.runtime.kv_convert import TORCH_DTYPES, KVPayload, convert, stacked_view
from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.runtime.kv_transfer import extract_blocks, insert_blocks
from hetserve.runtime.stage_link import StageLink, split_address

if TYPE_CHECKING:
    from hetserve.runtime.worker import ExtractKV, InsertKV, KVIn, KVOut, WorkerSpec


def init_tp_group(spec: WorkerSpec) -> Any:
    """Join the TP group (``spec.tp_size`` ranks); returns an in-place ``all_reduce`` (sum), or None at tp 1."""
    if spec.tp_size == 1:
        return None
    import torch.distributed as dist

    cuda = spec.device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(spec.device))
    host, port = split_address(spec.tp_store)
    timeout = datetime.timedelta(seconds=spec.tp_timeout_s)
    store = dist.TCPStore(host, port, spec.tp_size, spec.tp_rank == 0, timeout=timeout)
    dist.init_process_group(
        "nccl" if cuda else "gloo", store=store, rank=spec.tp_rank, world_size=spec.tp_size, timeout=timeout
    )

    def all_reduce(t: torch.Tensor) -> None:
        dist.all_reduce(t)

    return all_reduce


def build_runner(spec: WorkerSpec, cfg: EngineConfig) -> ModelRunner:
    """The worker's model runner over its stage's layers and its TP rank's shard; ``runner.stage_io`` is the
    stage link (None for a single-stage instance)."""
    link = None
    if spec.pp_listen or spec.pp_next:
        link = StageLink(spec.pp_listen, spec.pp_next, spec.pp_token)
    all_reduce = init_tp_group(spec)
    parallel = ParallelSpec(spec.layer_start, spec.layer_end, spec.tp_rank, spec.tp_size, all_reduce)
    if spec.load_format == "dummy":  # random weights of the checkpoint's shapes, made on the device
        from hetserve.engine.model.loader import init_random_model
        from hetserve.engine.runner import resolve_device, resolve_dtype

        mc = ModelConfig.from_path(spec.model)
        device = resolve_device(cfg.device.device)
        model = init_random_model(mc, device, resolve_dtype(cfg.device.dtype, device), seed=spec.seed,
                                  parallel=parallel)
        return ModelRunner(cfg, model=model, model_config=mc, parallel=parallel, stage_io=link,
                           cache_kv_heads=_hetis_kept(spec, mc))
    if spec.load_format != "auto":
        raise ValueError(f"load_format must be auto or dummy, got {spec.load_format!r}")
    return ModelRunner(cfg, parallel=parallel, stage_io=link,
                       cache_kv_heads=_hetis_kept(spec, ModelConfig.from_path(spec.model)) if spec.hetis else None)


def _hetis_kept(spec: WorkerSpec, mc: Any) -> int | None:
    """KV heads a Hetis main keeps in its own cache (None: not a Hetis main)."""
    return None if spec.hetis is None else mc.num_key_value_heads - sum(spec.hetis.assignment)


def local_descriptor(spec: WorkerSpec, runner: ModelRunner) -> KVDescriptor:
    """This worker's cache: layer-major NHD, one ``[2, B, block, H_local, D]`` tensor per layer of its stage."""
    mc = runner.model_config
    return KVDescriptor(
        num_layers=runner.num_local_layers,
        num_kv_heads=mc.num_key_value_heads,
        head_dim=mc.head_dim,
        block_size=spec.block_size,
        dtype=spec.dtype,  # type: ignore[arg-type]
        layout="NHD",
        arrangement="layer_major",
        tp_size=spec.tp_size,
        tp_rank=spec.tp_rank,
    )


def extract_kv(runner: ModelRunner, desc: KVDescriptor, cmd: ExtractKV) -> KVOut:
    """This worker's layers and heads of a request's KV, converted to the wire format (``cmd.wire`` describes
    the whole receiving instance; the answer holds ``desc.num_layers`` layers from ``layer_start``)."""
    from hetserve.runtime.worker import KVOut

    src = extract_blocks(runner.kv_caches, cmd.block_ids, cmd.num_tokens, desc)
    wire = dataclasses.replace(cmd.wire, num_layers=desc.num_layers)
    p = convert(src, desc, wire, cmd.num_tokens, heads=desc.head_range)
    bufs = [t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes() for t in p.tensors]
    return KVOut(
        seq=cmd.seq,
        transfer_id=cmd.transfer_id,
        ok=True,
        wire=p.desc,
        head_start=p.head_start,
        shapes=[list(t.shape) for t in p.tensors],
        buffers=bufs,
        layer_start=runner.parallel.layer_start,
    )


def _read_only_tensor(b: Any) -> torch.Tensor:
    """A uint8 view of a received buffer without copying it (converted into the cache, never written)."""
    if isinstance(b, torch.Tensor):  # a device tensor that came by CUDA IPC
        return b.reshape(-1).view(torch.uint8)
    mv = memoryview(b).cast("B") if not isinstance(b, (bytes, bytearray)) else memoryview(b)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only buffer: torch warns, nothing writes it
        return torch.frombuffer(mv, dtype=torch.uint8)


def insert_kv(runner: ModelRunner, desc: KVDescriptor, cmd: InsertKV, borrowed: bool = False) -> KVIn:
    """Join the shards (each: some layers, some heads, in ``cmd.wire``'s format) into this worker's heads and
    cache format, layer by layer, and write them into ``cmd.block_ids``. ``borrowed``: the buffers are the
    sender's (its staging, read through CUDA IPC): read, never written."""
    from hetserve.runtime.worker import KVIn

    dt = TORCH_DTYPES[cmd.wire.dtype]
    start = runner.parallel.layer_start
    if _insert_all_layers(runner, desc, cmd, dt, start, borrowed):
        return KVIn(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=True)
    wire1 = dataclasses.replace(cmd.wire, num_layers=1)
    local1 = dataclasses.replace(desc, num_layers=1)
    per_layer: list[list[KVPayload]] = [[] for _ in range(desc.num_layers)]
    for sh in cmd.shards:
        for j, (b, shape) in enumerate(zip(sh.buffers, sh.shapes, strict=True)):
            i = sh.layer_start + j - start
            if not 0 <= i < desc.num_layers:
                continue
            t = _read_only_tensor(b).view(dt).view(shape)
            per_layer[i].append(KVPayload(wire1, cmd.num_tokens, [t], sh.head_start, None))
    for i, pieces in enumerate(per_layer):
        if not pieces:
            raise ValueError(f"no KV for layer {start + i} in the transfer")
        kv = convert(pieces, wire1, local1, cmd.num_tokens)
        insert_blocks([runner.kv_caches[i]], cmd.block_ids, kv, local1)
    return KVIn(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=True)


def _insert_all_layers(runner: ModelRunner, desc: KVDescriptor, cmd: InsertKV, dt: torch.dtype, start: int,
                       borrowed: bool = False) -> bool:
    """When every shard brings all of this worker's layers as views of one buffer (a packed piece): convert and
    write them in one pass (a few kernels instead of a few per layer). False: the caller goes layer by layer."""
    n_layers = desc.num_layers
    if n_layers < 2:
        return False
    pieces = []
    for sh in cmd.shards:
        if sh.layer_start > start or sh.layer_start + len(sh.buffers) < start + n_layers:
            return False
        skip = start - sh.layer_start
        rows = sh.buffers
        if (isinstance(rows, LayerViews) and rows.intact() and skip == 0 and len(rows) == n_layers
                and all(shape == sh.shapes[0] for shape in sh.shapes)):
            # a packed piece's layers, one [layers, bytes] tensor: viewed at once, no per-layer checks
            ts: list[torch.Tensor] = LayerViews(rows.whole.view(dt).view(n_layers, *sh.shapes[0]))
        else:
            ts = [_read_only_tensor(b).view(dt).view(shape)
                  for b, shape in zip(sh.buffers[skip:skip + n_layers], sh.shapes[skip:skip + n_layers], strict=True)]
            if stacked_view(ts) is None:
                return False
        pieces.append(KVPayload(dataclasses.replace(cmd.wire, num_layers=n_layers), cmd.num_tokens, ts,
                                sh.head_start, None))
    wire = dataclasses.replace(cmd.wire, num_layers=n_layers)
    # device buffers are the transport's own copies (CUDA IPC): converted in place where nothing changes; host
    # buffers may be read-only mappings of a shared-memory segment
    consume = not borrowed and all(isinstance(b, torch.Tensor) and b.is_cuda for sh in cmd.shards for b in sh.buffers)
    kv = convert(pieces, wire, desc, cmd.num_tokens, consume=consume)
    insert_blocks(runner.kv_caches, cmd.block_ids, kv, desc)
    return True
