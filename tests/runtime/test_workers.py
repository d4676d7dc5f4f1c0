"""Worker processes: typed messages round-trip, a RemoteExecutor serves LLMEngine like the in-process runner."""

from __future__ import annotations

import pytest

from hetserve.core.config import EngineConfig
from hetserve.core.outputs import (
    Logprobs,
    ModelRunnerOutput,
    NewRequestInfo,
    ScheduledRequest,
    SchedulerOutput,
)
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.llm_engine import LLMEngine
from hetserve.llm import LLM
from hetserve.runtime.remote_executor import RemoteExecutor
from hetserve.runtime.worker import (
    Execute,
    StepDone,
    WorkerDied,
    WorkerSpec,
    decode_cmd,
    decode_reply,
    encode_msg,
)


def test_step_messages_round_trip_without_pickle() -> None:
    so = SchedulerOutput(
        scheduled=[ScheduledRequest("a", [1, 2], 0, 2, [1], True,
                                    NewRequestInfo([1, 2], [], SamplingParams(max_tokens=3, stop=["x"]), [0]))],
        total_num_scheduled_tokens=2, finished_req_ids={"b"}, preempted_req_ids={"c"},
    )
    data = encode_msg(Execute(seq=7, so=so))
    assert b"\x80\x04" not in data[:2]  # not a pickle protocol header
    back = decode_cmd(data)
    assert isinstance(back, Execute) and back.seq == 7 and back.so == so
    ro = ModelRunnerOutput(["a"], [[5]], [Logprobs(5, -0.25, 1, [5, 3], [-0.25, -2.0])])
    rb = decode_reply(encode_msg(StepDone(seq=7, ro=ro, step_s=0.5)))
    assert rb.ro == ro
    import pickle

    with pytest.raises(Exception):  # noqa: B017 - any decode error; never unpickled
        decode_cmd(pickle.dumps(so))


def test_remote_executor_matches_in_process(tiny_llama_dir) -> None:
    model = str(tiny_llama_dir)
    prompts = [[3, 17, 99, 5], list(range(10, 40))]
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ref = [o.outputs[0].token_ids for o in
           LLM(model, max_model_len=128, num_blocks=64, dtype="float32", device="cpu").generate(prompts, sp)]
    spec = WorkerSpec(name="w", model=model, num_blocks=64, max_model_len=128)
    ex = RemoteExecutor(spec, step_timeout_s=30.0)
    try:
        cfg = EngineConfig.from_kwargs(model, max_model_len=128, num_blocks=64, dtype="float32", device="cpu")
        eng = LLMEngine(cfg, executor=ex)
        for i, p in enumerate(prompts):
            eng.add_request(str(i), p, sp)
        got: dict[str, list[int]] = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    got[o.request_id] = o.outputs[0].token_ids
        assert [got["0"], got["1"]] == ref
        ex.handle.process.kill()
        ex.handle.process.join(5)
        eng.add_request("late", prompts[0], sp)
        with pytest.raises(WorkerDied):
            eng.step()
    finally:
        ex.shutdown()
    assert not ex.handle.process.is_alive()
