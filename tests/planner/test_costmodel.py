from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetserve.core.devices import DeviceSpec, GiB, LinkSpec, get_device, get_link
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.costmodel import BatchShape, CostModel
from hetserve.planner.profile import DeviceProfile, Table1D, Table2D, model_shape_hash

ROOT = Path(__file__).resolve().parents[2]

# h=64, q=4x16=64, kv=2x16=32, i=128, V=100, 2 layers, bf16 (2 bytes everything)
TOY = ModelConfig.from_dict(
    {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 100,
    }
)
DEV = DeviceSpec(
    "toy",
    "custom",
    GiB,
    {"bfloat16": 1e12},
    1e11,
    1,
    gemm_efficiency=0.5,
    hbm_efficiency=0.8,
    step_overhead_s=1e-5,
    reserved_bytes=0,
)
MIXED = BatchShape(prefill_chunks=((8, 4),), num_decode_seqs=3, decode_context_tokens=30)


def llama8b() -> ModelConfig:
    return ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")


def test_roofline_by_hand_mixed_batch() -> None:
    cm = CostModel(TOY, DEV, gemm_half_tokens=0.0)
    # linear params a layer: 64*64 + 2*64*32 + 64*64 + 3*64*128 = 36864; + 2 norms of 64 = 36992
    # T = 8 + 3 = 11 tokens; peak*e_c = 1e12*0.5; hbm*e_m = 1e11*0.8 = 8e10
    dense_compute = 2 * 11 * 36864 / 5e11
    dense_memory = (36992 * 2 + 11 * 2 * (4 * 64 + 2 * 64 + 2 * 32 + 3 * 128)) / 8e10
    elementwise = 11 * 2 * (8 * 64 + 2 * (64 + 32) + 3 * 128) / 8e10
    # prefill chunk (8 new, 4 cached): pairs 8*4 + 8*9/2 = 68, keys 12; attention peak = 5e11 * 0.6
    pf = max(4 * 16 * 4 * 68 / 3e11, (2 * 16 * 2 * 2 * 12 + 8 * 2 * (2 * 64 + 2 * 32)) / 8e10)
    # 3 decodes, 30 cached tokens in all: 33 keys
    dec = max(4 * 16 * 4 * 33 / 3e11, (2 * 16 * 2 * 2 * 33 + 3 * 2 * (2 * 64 + 2 * 32)) / 8e10)
    layer = max(dense_compute, dense_memory) + elementwise + pf + dec
    # LM head over 4 rows (one per request): weights 100x64 bf16, fp32 logits written + read twice
    lm = max(2 * 4 * 64 * 100 / 5e11, (100 * 64 * 2 + 3 * 4 * 100 * 4) / 8e10)
    embed = 11 * 2 * 64 * 2 / 8e10
    expected = 2 * layer + lm + embed + 1e-5
    assert cm.step_time_s(MIXED) == pytest.approx(expected, rel=1e-12)
    assert cm.step_time_from_lists([8, 1, 1, 1], [4, 10, 10, 10]) == pytest.approx(expected, rel=1e-12)
    bd = cm.breakdown(MIXED)
    assert sum(bd.values()) == pytest.approx(expected, rel=1e-12)
    assert bd["attention"] == pytest.approx(2 * (pf + dec), rel=1e-12)
    assert cm.step_time_s(BatchShape()) == 0.0


def test_compute_efficiency_saturates_with_tokens() -> None:
    cm = CostModel(TOY, DEV)  # gemm_half_tokens = 64: at 64 tokens half of gemm_efficiency
    assert cm.e_compute(64) == pytest.approx(0.25)
    assert cm.e_compute(1e9) == pytest.approx(0.5, rel=1e-6)
    bd = cm.breakdown(BatchShape(((64, 0),)))
    compute = 2 * 64 * 36864 / (1e12 * 0.25)
    memory = (36992 * 2 + 64 * 2 * 832) / 8e10
    elementwise = 64 * 2 * 1088 / 8e10
    assert bd["dense"] == pytest.approx(2 * (max(compute, memory) + elementwise), rel=1e-12)


def test_tensor_parallel_divides_work_and_adds_ring_allreduce() -> None:
    link = LinkSpec("l", "pcie", 1e9, 1e-6)
    cm = CostModel(TOY, DEV, tp=2, tp_link=link, gemm_half_tokens=0.0)
    bd = cm.breakdown(MIXED)
    # 2 layers x 2 all-reduces x ring(11 tokens x 64 x 2 bytes): 2*(2-1)/2 * bytes / bw + 2*(2-1)*latency
    assert bd["allreduce"] == pytest.approx(2 * 2 * (1408 / 1e9 + 2e-6), rel=1e-12)
    # per device: heads 2, kv heads 1, intermediate 64 -> linear params 18432
    dense = max(2 * 11 * 18432 / 5e11, ((18432 + 128) * 2 + 11 * 2 * (4 * 64 + 2 * 32 + 2 * 16 + 3 * 64)) / 8e10)
    dense += 11 * 2 * (8 * 64 + 2 * (32 + 16) + 3 * 64) / 8e10
    assert bd["dense"] == pytest.approx(2 * dense, rel=1e-12)
    # vocab-parallel LM head (50 rows a device) + all-gather of 4 x 100 fp32 logits
    lm = max(2 * 4 * 64 * 50 / 5e11, (50 * 64 * 2 + 3 * 4 * 50 * 4) / 8e10) + (1 / 2 * 1600 / 1e9 + 1e-6)
    assert bd["lm_head"] == pytest.approx(lm, rel=1e-12)
    with pytest.raises(ValidationError) as e:
        CostModel(TOY, DEV, tp=3)
    assert e.value.field == "tp"


def test_decode_floor_matches_gpu_md() -> None:
    # GPU.md: Llama-3-8B bf16 weights 16.1 GB -> a decode step >= ~5.4 ms on the H100 (3.0 TB/s copy)
    m = llama8b()
    cm = CostModel(m, get_device("H100-SXM"))
    t = cm.decode_time_s(1, 1024)
    assert 5.4e-3 <= t <= 5.4e-3 * 1.25
    # H200: ~3.7 ms floor
    assert 3.7e-3 <= CostModel(m, get_device("H200")).decode_time_s(1, 1024) <= 3.7e-3 * 1.25
    # prefill of 4k tokens is compute bound: at least 2 * params * tokens / measured 781 TFLOP/s
    assert cm.prefill_time_s(4096) >= 2 * m.num_params() * 4096 / 781e12


def test_memory_footprint_by_hand() -> None:
    m = llama8b()
    cm = CostModel(m, get_device("H100-SXM"))
    fp = cm.memory_footprint(max_num_seqs=256, max_num_batched_tokens=2048)
    assert fp["weights_bytes"] == m.weight_bytes("bfloat16") == 8_030_261_248 * 2
    # MLP half dominates: 2*4096 + 3*14336 = 51200 live values a token; logits fp32 x2 for 256 rows
    activation = 2048 * 51200 * 2 + 256 * 128256 * 4 * 2
    assert fp["activation_bytes"] == activation
    budget = int(80 * 2**30 * 0.9)
    kv_avail = budget - 8_030_261_248 * 2 - activation - 2**30
    assert fp["kv_bytes_available"] == kv_avail
    assert fp["kv_bytes_per_token"] == 128 * 1024  # GPU.md: 128 KiB a token
    assert fp["max_kv_tokens"] == kv_avail // (131072 * 16) * 16
    assert cm.fits(256, 2048)
    # a 70B model does not fit one A10; 8B bf16 does not fit a 16 GB T4; a memory cap is honoured
    m70 = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-70b")
    assert not CostModel(m70, get_device("A10")).fits(1, 512)
    assert not CostModel(m, get_device("T4")).fits(1, 512)
    assert CostModel(m, get_device("A10")).fits(8, 512)
    assert not CostModel(m, get_device("A10")).fits(8, 512, memory_bytes=16 * GiB)
    assert not CostModel(m, get_device("A10"), memory_bytes=16 * GiB).fits(8, 512)
    # TP=8 on 70B: weights split ~8 ways
    w8 = CostModel(m70, get_device("H100-SXM"), tp=8).weight_bytes()
    assert m70.weight_bytes() / 8 <= w8 <= m70.weight_bytes() / 8 * 1.01


def test_kv_transfer_by_hand() -> None:
    m = llama8b()
    cm = CostModel(m, get_device("H100-SXM"))
    link = get_link("pcie4x16")
    nbytes = 1000 * 131072
    hbm = 3.35e12 * 0.795
    assert cm.kv_transfer_time_s(1000, link, conversion=False) == pytest.approx(5e-6 + nbytes / 25e9)
    assert cm.kv_transfer_time_s(1000, link) == pytest.approx(5e-6 + nbytes / 25e9 + 2 * nbytes / hbm)
    # bf16 -> fp8: the wire carries the fp8 half
    t = cm.kv_transfer_time_s(1000, link, "bfloat16", "fp8")
    assert t == pytest.approx(5e-6 + nbytes / 2 / 25e9 + 1.5 * nbytes / hbm)
    assert cm.activation_bytes(10) == 10 * 4096 * 2


def test_pipeline_stages_add_up() -> None:
    m = llama8b()
    dev = get_device("A100-80GB")
    full = CostModel(m, dev)
    first = CostModel(m, dev, layers=(0, 12))
    second = CostModel(m, dev, layers=(12, 32))
    assert first.include_embedding and not first.include_lm_head
    assert second.include_lm_head and not second.include_embedding
    b = BatchShape(((300, 200),), 40, 40 * 900)
    assert first.step_time_s(b) + second.step_time_s(b) == pytest.approx(full.step_time_s(b) + dev.step_overhead_s)
    assert first.weight_bytes() + second.weight_bytes() == full.weight_bytes()
    assert first.kv_bytes_per_token() * 32 == full.kv_bytes_per_token() * 12
    with pytest.raises(ValidationError) as e:
        CostModel(m, dev, layers=(10, 40))
    assert e.value.field == "layers"


def test_head_subset_attention_scales_with_heads() -> None:
    m = llama8b()
    cm = CostModel(m, get_device("L4"))
    b = BatchShape((), 64, 64 * 2000)  # decode attention is memory bound: linear in heads
    full = cm.attention_time_s(b)
    assert cm.attention_time_s(b, num_kv_heads=2) == pytest.approx(full * 2 / 8)
    assert cm.step_time_s(b, num_kv_heads=0) == pytest.approx(cm.step_time_s(b) - full)
    assert cm.kv_bytes_per_token(num_kv_heads=2) * 4 == cm.kv_bytes_per_token()


def _toy_profile(**kw: object) -> DeviceProfile:
    base = dict(
        device_name="toy",
        emulation=None,
        model_name="toy",
        shape_hash=model_shape_hash(TOY),
        dtype="bfloat16",
        kv_cache_dtype="bfloat16",
        tp=1,
        dense=Table1D((1.0, 16.0, 256.0), (1e-5, 2e-5, 1.7e-4)),
        decode_attn=Table2D((1.0, 4.0), (0.0, 100.0), ((1e-6, 2e-6), (3e-6, 5e-6))),
        prefill_attn=Table2D((8.0, 64.0), (0.0, 64.0), ((1e-6, 3e-6), (4e-6, 8e-6))),
        lm_head=Table1D((1.0, 64.0), (5e-6, 1.2e-5)),
        step_overhead_s=2e-5,
    )
    base.update(kw)
    return DeviceProfile(**base)  # type: ignore[arg-type]


def test_profile_wins_over_roofline() -> None:
    cm = CostModel(TOY, DEV, profile=_toy_profile())
    dense = 1e-5 + 1e-5 * (11 - 1) / 15  # T = 11 between 1 and 16
    decode = 1.1e-6 + (3.2e-6 - 1.1e-6) * (3 - 1) / 3  # 3 seqs at mean context 10
    prefill = 1e-6 + 2e-6 * 4 / 64  # chunk (8, 4)
    lm = 5e-6 + 7e-6 * 3 / 63
    embed = 11 * 2 * 64 * 2 / 8e10  # roofline: not in the profile
    assert cm.step_time_s(MIXED) == pytest.approx(2 * (dense + decode + prefill) + lm + embed + 2e-5, rel=1e-12)
    # without the optional tables the roofline fills in attention and the LM head
    bare = CostModel(TOY, DEV, profile=_toy_profile(decode_attn=None, prefill_attn=None, lm_head=None))
    roof = CostModel(TOY, DEV)
    expect = 2 * (dense + roof.breakdown(MIXED)["attention"] / 2) + roof.breakdown(MIXED)["lm_head"] + embed + 2e-5
    assert bare.step_time_s(MIXED) == pytest.approx(expect, rel=1e-12)


def test_host_overheads_by_hand() -> None:
    """Per step o, per request o_seq, per request new to the executor o_new, per token of those o_tok."""
    prof = _toy_profile(step_overhead_per_seq_s=3e-6, new_seq_overhead_s=4e-5, new_seq_overhead_per_token_s=1e-7)
    cm = CostModel(TOY, DEV, profile=prof)
    old = BatchShape(((8, 4),), 3, 30)
    new = BatchShape(((8, 4),), 3, 30, num_new_seqs=2, new_seq_tokens=9)  # the chunk and one decode row are new
    base = CostModel(TOY, DEV, profile=_toy_profile()).step_time_s(old)
    assert cm.step_time_s(old) == pytest.approx(base + 4 * 3e-6, rel=1e-12)
    assert cm.step_time_s(new) == pytest.approx(base + 4 * 3e-6 + 2 * 4e-5 + 9 * 1e-7, rel=1e-12)
    assert cm.breakdown(new)["overhead"] == pytest.approx(2e-5 + 4 * 3e-6 + 2 * 4e-5 + 9 * 1e-7, rel=1e-12)
    assert sum(cm.breakdown(new).values()) == pytest.approx(cm.step_time_s(new), rel=1e-12)
    # no profile: the device's fixed overhead only; new requests cost nothing extra
    roof = CostModel(TOY, DEV)
    assert roof.step_time_s(new) == roof.step_time_s(old) and roof.idle_wake_s(1.0) == 0.0


def test_idle_wake_from_the_profile_is_clamped_at_the_grid_ends() -> None:
    wake = Table1D((0.0, 0.001, 0.02), (0.0, 2e-4, 8e-4))
    cm = CostModel(TOY, DEV, profile=_toy_profile(idle_wake=wake))
    assert cm.idle_wake_s(0.0) == 0.0 and cm.idle_wake_s(-1.0) == 0.0
    assert cm.idle_wake_s(0.0005) == pytest.approx(1e-4, rel=1e-12)
    assert cm.idle_wake_s(0.0105) == pytest.approx(5e-4, rel=1e-12)
    assert cm.idle_wake_s(10.0) == pytest.approx(8e-4, rel=1e-12)  # not extrapolated past the last gap
    assert CostModel(TOY, DEV, profile=_toy_profile()).idle_wake_s(10.0) == 0.0


def test_profile_copy_bandwidth_replaces_datasheet() -> None:
    cm = CostModel(TOY, DEV, profile=_toy_profile(copy_bytes_per_s=1e10))
    link = LinkSpec("l", "pcie", 1e9, 0.0)
    nbytes = 100 * 2 * 2 * 2 * 16 * 2  # 100 tokens x K,V x 2 layers x 2 heads x 16 x 2 bytes
    assert cm.kv_transfer_time_s(100, link) == pytest.approx(nbytes / 1e9 + 2 * nbytes / 1e10)


def test_profile_must_match_model_dtype_and_device() -> None:
    other = ModelConfig.from_dict({**TOY.raw, "hidden_size": 128})
    with pytest.raises(ValidationError, match="shape"):
        CostModel(other, DEV, profile=_toy_profile())
    with pytest.raises(ValidationError, match="float16"):
        CostModel(
            TOY,
            DeviceSpec("toy", "custom", GiB, {"bfloat16": 1e12, "float16": 1e12}, 1e11, 1),
            dtype="float16",
            profile=_toy_profile(),
        )
    with pytest.raises(ValidationError, match="toy"):
        CostModel(TOY, get_device("A10"), profile=_toy_profile())
    with pytest.raises(ValidationError) as e:
        CostModel(TOY, get_device("A10"), dtype="fp8")
    assert e.value.field == "dtype"


def test_batch_shape_from_lists() -> None:
    b = BatchShape.from_lists([5, 1, 1, 0, 300], [0, 10, 20, 7, 1000])
    assert b == BatchShape(((5, 0), (300, 1000)), 2, 30, decode_max_context=20)
    assert b.num_tokens == 307 and b.num_reqs == 4


def test_batch_shape_from_scheduler_output() -> None:
    from hetserve.core.outputs import NewRequestInfo, ScheduledRequest, SchedulerOutput
    from hetserve.core.sampling_params import SamplingParams

    def sr(n: int, c: int, sample: bool) -> ScheduledRequest:
        return ScheduledRequest(
            req_id=f"r{n}-{c}", token_ids=[], num_computed_tokens=c, num_tokens=n, new_block_ids=[], sample=sample
        )

    out = SchedulerOutput(
        scheduled=[sr(8, 4, False), sr(1, 10, True), sr(1, 12, True), sr(1, 8, True)], total_num_scheduled_tokens=11
    )
    assert BatchShape.from_scheduler_output(out) == BatchShape(((8, 4),), 3, 30, 3, decode_max_context=12)
    # requests the executor sees for the first time carry NewRequestInfo: counted with their tokens
    info = NewRequestInfo(prompt_token_ids=[5] * 12, output_token_ids=[], sampling_params=SamplingParams(),
                          eos_token_ids=[])
    fresh = [sr(8, 4, False), sr(1, 10, True), sr(1, 12, True), sr(1, 8, True)]
    fresh[0].new = info
    fresh[2].new = info
    shape = BatchShape.from_scheduler_output(SchedulerOutput(scheduled=fresh, total_num_scheduled_tokens=11))
    assert (shape.num_new_seqs, shape.new_seq_tokens) == (2, 9)
    cm = CostModel(TOY, DEV, gemm_half_tokens=0.0)
    # one row fewer through the LM head than one per request (the partial prefill does not sample)
    lm3 = max(2 * 3 * 64 * 100 / 5e11, (100 * 64 * 2 + 3 * 3 * 100 * 4) / 8e10)
    lm4 = max(2 * 4 * 64 * 100 / 5e11, (100 * 64 * 2 + 3 * 4 * 100 * 4) / 8e10)
    assert cm.step_time_from_scheduler_output(out) == pytest.approx(cm.step_time_s(MIXED) - lm4 + lm3, rel=1e-12)


def test_step_time_is_fast() -> None:
    cm = CostModel(llama8b(), get_device("H100-SXM"))
    shapes = [BatchShape(((512, 100 * k),), 100 + k, (100 + k) * 700) for k in range(50)]
    shapes += [BatchShape((), 1 + k, (1 + k) * 900) for k in range(50)]
    t0 = time.perf_counter()
    for _ in range(200):
        for s in shapes:
            cm.step_time_s(s)
    per_call = (time.perf_counter() - t0) / (200 * len(shapes))
    assert per_call < 50e-6, per_call  # ~2 us on one core; generous bound for slow CI


def test_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import hetserve.core.devices, hetserve.core.cluster, hetserve.planner\n"
        "from hetserve.planner.costmodel import CostModel, BatchShape\n"
        "from hetserve.planner.profile import load_profile\n"
        "from hetserve.core.cluster import load_cluster\n"
        "from hetserve.core.model_config import ModelConfig\n"
        "c = load_cluster('examples/clusters/mixed-16.yaml')\n"
        "m = ModelConfig.from_path('examples/models/qwen2.5-7b')\n"
        "print(CostModel(m, c.devices[0].spec).step_time_s(BatchShape(((100, 0),), 4, 400)))\n"
        "assert not any(k == 'torch' or k.startswith('torch.') for k, v in sys.modules.items() if v is not None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout) > 0


def test_graph_timed_profile_floors_the_steps_the_runtime_runs_eagerly() -> None:
    """A profile timed through CUDA graphs holds for decode-only batches of a whole-model runner. Any other step
    costs at least a launch floor per layer (by hand: max(graphed layers, L x floor)): the piecewise-graph floor
    up to PIECEWISE_MAX_TOKENS tokens (mixed steps, batches past the largest decode graph, pipeline stages), the
    eager floor beyond it and wherever the runtime never graphs (a Hetis main: ``piecewise_max_tokens = 0``)."""
    from hetserve.planner.runtime_terms import (
        EAGER_FLOOR_S_PER_LAYER,
        GRAPH_MAX_BATCH,
        PIECEWISE_FLOOR_S_PER_LAYER,
        PIECEWISE_MAX_TOKENS,
    )

    graphed = _toy_profile(meta={"timing": {"dense_s_per_layer": "graph"}})
    cm = CostModel(TOY, DEV, profile=graphed)
    plain = CostModel(TOY, DEV, profile=_toy_profile())  # eager-timed (a CPU profile): no floor
    L = TOY.num_hidden_layers
    decode = BatchShape((), 3, 30)
    # a graph step: no floor; its dense layers run at the batch of the decode graph it replays (3 -> 4)
    pad = L * (plain._dense_layer_s(4) - plain._dense_layer_s(3))
    assert pad > 0
    assert cm.step_time_s(decode) == pytest.approx(plain.step_time_s(decode) + pad, rel=1e-12)
    assert cm.piecewise_max_tokens == PIECEWISE_MAX_TOKENS
    past = CostModel(TOY, DEV, profile=graphed)
    past.piecewise_max_tokens = MIXED.num_tokens - 1  # the same step, past the largest piecewise bucket
    small_graphs = CostModel(TOY, DEV, profile=graphed)
    assert small_graphs.graph_max_batch == GRAPH_MAX_BATCH
    small_graphs.graph_max_batch = decode.num_reqs - 1  # the decode batch, past the largest decode graph
    cases = [(cm, MIXED, PIECEWISE_FLOOR_S_PER_LAYER),
             (small_graphs, decode, PIECEWISE_FLOOR_S_PER_LAYER),
             (past, MIXED, EAGER_FLOOR_S_PER_LAYER)]
    for model, b, per_layer in cases:
        floor = L * per_layer
        bd = plain.breakdown(b)
        layers = bd["dense"] + bd["attention"] + bd["allreduce"]
        assert layers < floor  # the toy's layers are tiny: the launch floor decides
        assert model.step_time_s(b) == pytest.approx(plain.step_time_s(b) - layers + floor, rel=1e-12)
        assert sum(model.breakdown(b).values()) == pytest.approx(model.step_time_s(b), rel=1e-12)
        mb = model.breakdown(b)  # its layers at the padded size, still under the floor
        assert mb["eager_launch"] == pytest.approx(floor - mb["dense"] - mb["attention"] - mb["allreduce"], rel=1e-12)
    # a pipeline stage never replays a whole-model graph, but its steps run piecewise
    stage = CostModel(TOY, DEV, profile=graphed, layers=(0, 1))
    assert stage.graph_max_batch == 0
    assert stage.step_time_s(decode) >= PIECEWISE_FLOOR_S_PER_LAYER
    # a runner that never graphs (a Hetis main) pays the eager floor
    cm.graph_max_batch = cm.piecewise_max_tokens = 0
    assert cm.step_time_s(MIXED) >= L * EAGER_FLOOR_S_PER_LAYER
    # a measured floor in the profile wins over the default; GPU time above the floor is not floored
    slow = CostModel(TOY, DEV, profile=_toy_profile(meta={"timing": {"dense_s_per_layer": "graph"},
                                                          "piecewise_floor_s_per_layer": 1e-9}))
    pad = TOY.num_hidden_layers * (plain._dense_layer_s(slow._dense_tokens(MIXED))
                                   - plain._dense_layer_s(MIXED.num_tokens))  # its piecewise bucket
    assert slow.step_time_s(MIXED) == pytest.approx(plain.step_time_s(MIXED) + pad, rel=1e-12)


def test_async_scheduling_overlaps_host_and_device() -> None:
    """With async scheduling a step takes the longer of its device time and its host time (overhead terms plus
    launches), by hand from the sync model's parts; never longer than the sync step, never shorter than either.
    ``admit_serial_s_per_token`` per new prompt token stays on the device's critical path."""
    graphed = _toy_profile(meta={"timing": {"dense_s_per_layer": "graph"}})
    sync = CostModel(TOY, DEV, profile=graphed)
    asy = CostModel(TOY, DEV, profile=graphed)
    asy.async_scheduling = True
    for cm in (sync, asy):
        cm.new_seq_overhead_s, cm.new_seq_overhead_per_token_s = 2e-4, 1e-7
        cm.admit_serial_s_per_token = 3e-7
    admit = BatchShape(((2000, 0),), 3, 30, num_new_seqs=1, new_seq_tokens=2000)
    for b in (BatchShape((), 3, 30), MIXED, BatchShape((), 40, 4000), admit):
        bd = sync.breakdown(b)
        device = bd["dense"] + bd["attention"] + bd["allreduce"] + bd["lm_head"] + bd["embedding"]
        launch = sync._launch_floor_s(b)
        new = b.new_seq_tokens * 3e-7
        want = max(device + new, launch + bd["overhead"])
        assert asy.step_time_s(b) == pytest.approx(want, rel=1e-12)
        assert asy.step_time_s(b) <= sync.step_time_s(b) + 1e-15
        assert sum(asy.breakdown(b).values()) == pytest.approx(asy.step_time_s(b), rel=1e-12)
        assert asy.breakdown(b)["async_overlap"] <= 0.0
    # the new sequence's part is what the admitting step takes beyond the same step without it
    bd = sync.breakdown(admit)
    device = bd["dense"] + bd["attention"] + bd["allreduce"] + bd["lm_head"] + bd["embedding"]
    assert device > sync._launch_floor_s(admit) + bd["overhead"]  # device-bound: the host part would hide
    assert asy.step_time_s(admit) == pytest.approx(device + 2000 * 3e-7, rel=1e-12)
    # the host's own cost of a prompt token is never below what the device waits for (sync >= async)
    assert bd["overhead"] == pytest.approx(sync.breakdown(BatchShape(((2000, 0),), 3, 30))["overhead"]
                                           + 2e-4 + 2000 * 3e-7, rel=1e-12)


def test_graph_steps_pay_for_their_padded_size() -> None:
    """A runtime that replays CUDA graphs runs a step's dense layers at the captured size it pads to: decode
    batches 1, 2, 4, 8, then multiples of 8; piecewise token counts 16, 32, 48, 64, then multiples of 32 to
    512 and of 64 to 1024. Eager steps (past 1024 tokens) and runtimes without graphs pad nothing."""
    graphed = CostModel(TOY, DEV, profile=_toy_profile(meta={"timing": {"dense_s_per_layer": "graph"}}))
    plain = CostModel(TOY, DEV, profile=_toy_profile())
    by_hand = [(BatchShape((), 3, 30), 4), (BatchShape((), 17, 170), 24), (BatchShape((), 64, 640), 64),
               (BatchShape(((300, 0),), 21, 210), 352), (BatchShape(((17, 0),), 0, 0), 32),
               (BatchShape(((600, 0),), 1, 10), 640), (BatchShape(((1100, 0),), 0, 0), 1100)]
    for batch, rows in by_hand:
        assert graphed._dense_tokens(batch) == rows, batch
        assert plain._dense_tokens(batch) == batch.num_tokens
        assert graphed.breakdown(batch)["dense"] == pytest.approx(TOY.num_hidden_layers
                                                                  * plain._dense_layer_s(rows), rel=1e-12)


def test_uneven_decode_contexts_scale_attention_by_the_skew_table() -> None:
    """A decode batch whose longest context is m times its mean costs its even-context attention times
    ``1 + slope(n) x (m - 1)`` (slope interpolated over batch sizes, by hand below), but never more than the
    batch with every context at the longest; without the table, or with even contexts, nothing changes."""
    from hetserve.planner.profile import SkewTable

    skew = SkewTable((1.0, 4.0), (0.0, 0.3), 50.0, (1.0, 2.2))
    steep_ctx = Table2D((1.0, 4.0), (0.0, 100.0), ((1e-6, 2e-5), (3e-6, 5e-5)))  # attention grows with context
    plain = CostModel(TOY, DEV, profile=_toy_profile(decode_attn=steep_ctx))
    skewed = CostModel(TOY, DEV, profile=_toy_profile(decode_attn=steep_ctx, decode_attn_skew=skew))
    # 3 sequences with contexts 10, 5, 15: mean 10, largest 15 (m = 1.5); slope at 3 seqs = 0.3 * 2 / 3 = 0.2
    batch = BatchShape.from_lists([1, 1, 1], [10, 5, 15])
    assert (batch.num_decode_seqs, batch.decode_context_tokens, batch.decode_max_context) == (3, 30, 15)
    even = plain._attn_layer_s(batch, None)
    assert skewed._attn_layer_s(batch, None) == pytest.approx(even * (1 + 0.2 * 0.5), rel=1e-12)
    assert plain._attn_layer_s(batch, None) == pytest.approx(even, rel=1e-12)  # no table: the mean alone
    flat = BatchShape.from_lists([1, 1, 1], [10, 10, 10])
    assert skewed._attn_layer_s(flat, None) == pytest.approx(plain._attn_layer_s(flat, None), rel=1e-12)
    # a steep slope is capped by the batch with every context at the longest (3 x 90 keys)
    steep = CostModel(TOY, DEV, profile=_toy_profile(decode_attn=steep_ctx, decode_attn_skew=SkewTable(
        (1.0, 4.0), (9.0, 9.0), 50.0, (2.2, 2.2))))
    wide = BatchShape.from_lists([1, 1, 1, 8], [90, 0, 0, 4])
    assert wide.decode_max_context == 90 and wide.prefill_chunks == ((8, 4),)
    cap = plain._attn_layer_s(BatchShape((), 3, 270), None) + plain._attn_layer_s(BatchShape(((8, 4),)), None)
    assert steep._attn_layer_s(wide, None) == pytest.approx(cap, rel=1e-12)
    # the scheduler's view gives the same shape
    from hetserve.core.outputs import ScheduledRequest, SchedulerOutput

    so = SchedulerOutput([ScheduledRequest(req_id=f"r{i}", token_ids=[], num_computed_tokens=c, num_tokens=1,
                                           new_block_ids=[], sample=True) for i, c in enumerate([10, 5, 15])], 3)
    assert BatchShape.from_scheduler_output(so).decode_max_context == 15


def test_skew_table_round_trips_and_names_bad_fields(tmp_path) -> None:
    from hetserve.planner.profile import SkewTable, load_profile

    prof = _toy_profile(decode_attn_skew=SkewTable((1.0, 4.0), (0.0, 0.3), 50.0, (1.0, 2.2)))
    path = tmp_path / "p.json"
    prof.save(path)
    assert load_profile(path).decode_attn_skew == prof.decode_attn_skew
    d = prof.to_dict()
    d["tables"]["decode_attn_skew"]["max_over_mean"] = [0.5, 2.2]
    path.write_text(__import__("json").dumps(d))
    with pytest.raises(ValidationError, match="decode_attn_skew.max_over_mean"):
        load_profile(path)


def test_sustained_speed_scales_the_device_time_by_step_kind() -> None:
    """``mixed_device_scale`` / ``decode_device_scale`` multiply the device part of a mixed / decode step (by hand
    from the unscaled parts), not the host's; the breakdown sums to the step; a scale outside [0.5, 2] is refused."""
    from hetserve.core.errors import ValidationError

    plain = CostModel(TOY, DEV, profile=_toy_profile())
    scaled = CostModel(TOY, DEV, profile=_toy_profile(meta={"mixed_device_scale": 1.25, "decode_device_scale": 0.8}))
    for b, k in ((MIXED, 1.25), (BatchShape((), 3, 30), 0.8)):
        over = plain.breakdown(b)["overhead"]
        assert over > 0
        device = plain.step_time_s(b) - over
        assert scaled.step_time_s(b) == pytest.approx(device * k + over, rel=1e-12)
        assert sum(scaled.breakdown(b).values()) == pytest.approx(scaled.step_time_s(b), rel=1e-12)
        asy = CostModel(TOY, DEV, profile=_toy_profile(meta={"mixed_device_scale": 1.25, "decode_device_scale": 0.8}))
        asy.async_scheduling = True  # async: the device side (with the admission term) is scaled
        assert asy.step_time_s(b) == pytest.approx(max(device * k, over), rel=1e-12)
    with pytest.raises(ValidationError, match="mixed_device_scale"):
        CostModel(TOY, DEV, profile=_toy_profile(meta={"mixed_device_scale": 3.0}))
