"""Hetis messages (torch-free msgspec Structs, MessagePack on the wire; never pickle).

Two conversations:

* coordinator <-> main worker, over the worker's pipe (``worker.py`` puts these in its command / reply unions):
  ``WorkerSpec.hetis`` (a :class:`HetisSpec`) at launch; :class:`Redispatch` and :class:`HetisQuery`, both
  answered by :class:`HetisInfo`.
* main worker <-> one attention worker, over a socket pair made when the main worker launches it
  (``attn_worker.py``): a frame is a 4-byte header length, the MessagePack header, then the raw bytes of the
  tensors the header lists (:class:`~hetserve.runtime.messages.TensorMeta`), back to back.

Head ranges are global KV-head indices ``[head_start, head_start + num_heads)``; query heads ``h`` with
``h // group`` in the range go with them (GQA).
"""

from __future__ import annotations

from typing import Union

import msgspec

from hetserve.runtime.messages import TensorMeta

# ---- coordinator <-> main worker ----------------------------------------------------------------------


class AttnWorkerConf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One attention worker as the coordinator declares it to the main worker that launches it."""

    device_id: str  # the cluster's id ("host:1")
    device: str = "cpu"  # torch device the worker computes on ("cpu", "cuda:0")
    speed: float = 1.0  # relative speed of an emulated (paced) device
    backend: str = "auto"  # attention backend name on the worker
    torch_threads: int = 1
    env: dict[str, str] = {}  # extra environment of its process (an MPS client's share and memory cap)


class HetisSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """``WorkerSpec.hetis``: the main instance's attention workers and how many KV heads each holds first."""

    workers: list[AttnWorkerConf]
    assignment: list[int]  # KV heads per worker; the main keeps the rest (the lowest head indices)
    recv_timeout_s: float = 30.0  # longest wait for any attention worker's answer
    start_timeout_s: float = 120.0
    # per-layer q/k/v and outputs: "auto" (a shared mailbox, else frames), "mailbox" (fail without one),
    # "frames" (always through the socket); the main worker's HETSERVE_HETIS_DATA_PATH overrides "auto"
    data_path: str = "auto"


class Redispatch(msgspec.Struct, tag_field="type", tag="hetis_redispatch"):
    """Between steps: move to ``assignment``; ``block_ids`` are the blocks whose KV is in use (moved heads'
    KV is copied for those blocks, all layers)."""

    seq: int
    assignment: list[int]
    block_ids: list[int]


class HetisQuery(msgspec.Struct, tag_field="type", tag="hetis_query"):
    seq: int


class HetisInfo(msgspec.Struct, tag_field="type", tag="hetis_info"):
    """The main worker's split as it is now (the answer to both commands)."""

    seq: int
    ok: bool
    error: str = ""
    assignment: list[int] = []
    num_kept_heads: int = 0
    local_cache_shape: list[int] = []  # one layer's local cache: [2, blocks, block_size, kept heads, head_dim]
    local_kv_bytes_per_token: int = 0  # all layers, kept heads
    full_kv_bytes_per_token: int = 0  # all layers, all heads (the cache without Hetis)
    worker_pids: list[int] = []
    worker_heads: list[list[int]] = []  # [head_start, num_heads] per worker, as the workers report
    moved_bytes: int = 0  # KV bytes copied by this re-dispatch
    redispatch_s: float = 0.0
    data_paths: list[str] = []  # per worker: "cuda_ipc" / "shm" (a mailbox) or "frames"
    mailbox_layers: list[int] = []  # per worker: layers whose q/k/v and output went through the mailbox
    frame_layers: list[int] = []  # per worker: layers that went through the socket


# ---- main worker <-> attention worker -----------------------------------------------------------------


class AttnSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Sent first on a new attention worker's socket: the cache it holds and where it computes."""

    name: str
    num_layers: int
    num_heads: int  # query heads of the model
    num_kv_heads: int  # KV heads of the model
    head_dim: int
    num_blocks: int
    block_size: int
    dtype: str
    head_start: int
    num_heads_held: int  # KV heads [head_start, head_start + num_heads_held)
    device: str = "cpu"
    backend: str = "auto"
    speed: float = 1.0
    torch_threads: int = 1


class _Attn(msgspec.Struct, tag_field="type"):
    pass


class AttnReady(_Attn, tag="ready"):
    pid: int
    device: str
    backend: str


class StepMeta(_Attn, tag="step_meta"):
    """A step's attention metadata; tensors: positions i64 [T], slot_mapping i64 [T], query_start_loc i32
    [S+1], seq_lens i32 [S], block_tables i32 [S, W]."""

    num_tokens: int
    num_seqs: int
    max_query_len: int
    max_seq_len: int
    tensors: list[TensorMeta]


class LayerReq(_Attn, tag="layer"):
    """One layer of the current step; tensors: q [T, held heads x group, D], k and v [T, held heads, D]."""

    layer: int
    scale: float
    sliding_window: int | None
    tensors: list[TensorMeta]


class LayerOut(_Attn, tag="layer_out"):
    """The attention output rows of the held heads: one tensor [T, held heads x group, D]."""

    layer: int
    compute_s: float
    tensors: list[TensorMeta]


class MailboxOpen(_Attn, tag="mailbox_open"):
    """Open (and keep open) the main's shared buffer ``gen`` (replacing any older one); answered by
    :class:`MailboxReady`. ``kind`` "shm": a host file ``path`` of ``nbytes``; "cuda_ipc": the ``cuda_*``
    fields are a CUDA storage's ``_share_cuda_()``. Regions per layer: see ``hetis_mailbox.layout``."""

    kind: str
    gen: int
    nbytes: int
    dtype: str
    group: int  # query heads per KV head
    head_dim: int
    path: str = ""
    cuda_device: int = 0
    cuda_handle: bytes = b""
    cuda_storage_size: int = 0
    cuda_storage_offset: int = 0
    cuda_ref_handle: bytes = b""
    cuda_ref_offset: int = 0
    cuda_event_handle: bytes | None = None
    cuda_event_sync: bool = False


class MailboxReady(_Attn, tag="mailbox_ready"):
    gen: int
    ok: bool
    kind: str = ""
    error: str = ""


class LayerMB(_Attn, tag="layer_mb"):
    """One layer whose q [T, heads x group, D], k, v [T, heads, D] are in mailbox ``gen``; the output goes
    there too, then :class:`LayerDone` answers."""

    layer: int
    scale: float
    sliding_window: int | None
    num_tokens: int
    num_heads: int
    gen: int


class LayerDone(_Attn, tag="layer_done"):
    layer: int
    compute_s: float


class FetchHeads(_Attn, tag="fetch"):
    """Send back the KV of global heads ``heads`` in ``block_ids``, all layers: [L, 2, nb, block, n, D]."""

    heads: list[int]
    block_ids: list[int]


class HeadsKV(_Attn, tag="heads_kv"):
    heads: list[int]
    tensors: list[TensorMeta]


class AssignHeads(_Attn, tag="assign"):
    """Hold ``[head_start, head_start + num_heads)`` from now on: heads held before and still held keep their
    KV; ``incoming`` heads' KV for ``block_ids`` follows as one tensor [L, 2, nb, block, len(incoming), D]."""

    head_start: int
    num_heads: int
    block_ids: list[int]
    incoming: list[int]
    tensors: list[TensorMeta]


class Assigned(_Attn, tag="assigned"):
    head_start: int
    num_heads: int


class AttnError(_Attn, tag="error"):
    error: str


class AttnStop(_Attn, tag="stop"):
    pass


AttnMessage = Union[  # noqa: UP007 - msgspec needs a real Union
    AttnReady, StepMeta, LayerReq, LayerOut, FetchHeads, HeadsKV, AssignHeads, Assigned, AttnError, AttnStop,
    MailboxOpen, MailboxReady, LayerMB, LayerDone,
]
