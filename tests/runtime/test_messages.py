"""One encode / decode pair for every socket, and no pickle anywhere in the runtime."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import pytest

import hetserve.runtime
from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.runtime.messages import (
    Ack,
    Envelope,
    KVCommit,
    KVData,
    KVHello,
    MessageDecodeError,
    TensorMeta,
    decode,
    encode,
)

DESC = KVDescriptor(num_layers=2, num_kv_heads=4, head_dim=8, block_size=16, dtype="fp8_e4m3", tp_size=2, tp_rank=1)
MESSAGES = [
    KVHello(instance="decode-0", rank=1, address="tcp://127.0.0.1:5555", desc=DESC),
    KVData(transfer_id="t1", req_id="r1", src_rank=0, num_tokens=33, head_start=2, num_heads=2, desc=DESC,
           tensors=[TensorMeta("float8_e4m3fn", [3, 2, 16, 2, 8])], scales=TensorMeta("float32", [2, 2, 1]),
           final=False),
    KVCommit(transfer_id="t1", req_id="r1", src_rank=0),
    Envelope(msg_id=7, sender="ipc:///tmp/x", num_buffers=2, kind="shm", segment="s", spans=[(0, 10), (64, 3)],
             handles=[None, {"device": 0, "handle": b"\x01\x02"}]),
    Ack(msg_id=7, ok=False, error="nope"),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: object) -> None:
    assert decode(encode(msg)) == msg  # type: ignore[arg-type]


def test_plain_dict_headers_round_trip() -> None:
    h = {"a": 1, "b": [1.5, None, True], "c": {"d": b"\x00"}}
    assert decode(encode(h)) == h


@pytest.mark.parametrize("obj", [{"msg_id": 1}, KVCommit(transfer_id="t", req_id="r", src_rank=0), [1, 2], "x"])
def test_pickles_are_rejected(obj: object) -> None:
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        with pytest.raises(MessageDecodeError):
            decode(pickle.dumps(obj, protocol=protocol))


def test_invalid_messages_are_rejected_with_the_reason() -> None:
    with pytest.raises(MessageDecodeError, match="tp_size"):
        decode(encode({"type": "kv_hello", "instance": "x", "rank": 0, "address": "a",
                       "desc": {"num_layers": 2, "num_kv_heads": 3, "head_dim": 8, "block_size": 16, "tp_size": 2}}))
    with pytest.raises(MessageDecodeError):
        decode(encode({"type": "ack", "msg_id": "seven"}))
    with pytest.raises(MessageDecodeError, match="map"):
        decode(b"\x93\x01\x02\x03")  # a msgpack array, not a message
    with pytest.raises(TypeError):
        encode(object())  # type: ignore[arg-type]


_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "marshal", "jsonpickle"}
# APIs that pickle under the hood: pyzmq's *_pyobj, torch.save/load, multiprocessing queues and pipes
_PICKLE_ATTRS = {"send_pyobj", "recv_pyobj", "send_serialized", "recv_serialized", "Queue", "SimpleQueue",
                 "Pipe", "Manager", "save", "load"}


def test_runtime_never_uses_pickle() -> None:
    root = Path(hetserve.runtime.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                names = {(node.module or "").split(".")[0]} | {a.name for a in node.names}
            elif isinstance(node, ast.Attribute) and node.attr in _PICKLE_ATTRS:
                base = node.value
                owner = base.id if isinstance(base, ast.Name) else getattr(base, "attr", "")
                if node.attr in ("save", "load") and owner != "torch":
                    continue
                if node.attr in ("Queue", "SimpleQueue", "Pipe", "Manager") and owner not in ("multiprocessing", "mp"):
                    continue
                offenders.append(f"{path.name}:{node.lineno} {owner}.{node.attr}")
                continue
            else:
                continue
            bad = names & (_PICKLE_MODULES | {"multiprocessing"})
            if bad:
                offenders.append(f"{path.name}:{node.lineno} imports {sorted(bad)}")
    assert offenders == []
