"""The Triton paged-attention kernels against the reference backend (plain torch, float32, one sequence at a
time). On CPU the kernels run under Triton's interpreter; on a GPU they run compiled (float32 and bf16).

Every cache slot outside a sequence's context is NaN, so a kernel that reads a slot it must not see fails;
outputs are NaN-poisoned first, so a row the kernel forgets to write fails too.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from hetserve.engine.attention import AttentionMetadata, TorchRefBackend, TritonAttentionBackend
from hetserve.kernels import HAS_TRITON
from hetserve.kernels.attention import decode_num_splits, write_kv_cache
from hetserve.kernels.attention_launch import paged_attention
from hetserve.kernels.rotary import build_cos_sin_cache, rotary_torch

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv_cache: torch.Tensor
    meta: AttentionMetadata


def make_case(
    chunks: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    seed: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    pad_tokens: int = 0,
    pad_seqs: int = 0,
) -> Case:
    """``chunks[s] = (cached, new)``: sequence s has ``cached`` tokens in the cache and ``new`` query tokens.

    Padding as a CUDA graph replays it: ``pad_tokens`` extra query rows past ``query_start_loc[-1]`` (slot -1)
    and ``pad_seqs`` extra sequences with no query tokens and length 0.
    """
    gen = torch.Generator().manual_seed(seed)
    tables: list[list[int]] = []
    need = sum(-(-(c + n) // block_size) for c, n in chunks)
    num_blocks = need + 3
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # block 0 stays unused
    cache = torch.full((2, num_blocks, block_size, num_kv_heads, head_dim), float("nan"))
    slots: list[int] = []
    positions: list[int] = []
    starts = [0]
    for cached, new in chunks:
        table = [order.pop() for _ in range(-(-(cached + new) // block_size))]
        tables.append(table)
        for p in range(cached):
            b, o = table[p // block_size], p % block_size
            cache[:, b, o] = torch.randn(2, num_kv_heads, head_dim, generator=gen)
        for p in range(cached, cached + new):
            slots.append(table[p // block_size] * block_size + p % block_size)
            positions.append(p)
        starts.append(starts[-1] + new)
    num_real = starts[-1]
    slots += [-1] * pad_tokens
    positions += [0] * pad_tokens
    seq_lens = [c + n for c, n in chunks] + [0] * pad_seqs
    starts += [num_real] * pad_seqs
    tables += [[]] * pad_seqs
    width = max(1, max(len(t) for t in tables))
    num_tokens = num_real + pad_tokens
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    meta = AttentionMetadata(
        num_tokens=num_tokens,
        num_seqs=len(seq_lens),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device),
        max_query_len=max(n for _, n in chunks),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
    )
    to = {"device": device, "dtype": dtype}
    return Case(q.to(**to), k.to(**to), v.to(**to), cache.to(**to), meta)


def reference(case: Case, scale: float, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference output and cache, computed in float32 on the CPU."""
    cache = case.kv_cache.float().cpu()
    m = case.meta
    meta = AttentionMetadata(
        m.num_tokens, m.num_seqs, m.positions.cpu(), m.slot_mapping.cpu(), m.query_start_loc.cpu(),
        m.seq_lens.cpu(), m.block_tables.cpu(), m.max_query_len, m.max_seq_len, m.query_start_loc_cpu,
        m.seq_lens_cpu,
    )
    out = TorchRefBackend("cpu").forward(
        case.q.float().cpu(), case.k.float().cpu(), case.v.float().cpu(), cache, meta, scale, window
    )
    return out, cache


def assert_rows_close(out: torch.Tensor, ref: torch.Tensor, num_rows: int, dtype: torch.dtype) -> None:
    got = out[:num_rows].float().cpu()
    want = ref[:num_rows]
    assert not torch.isnan(got).any(), "unwritten or NaN-contaminated output rows"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = ((got - want).norm() / want.norm()).item()
    assert err < tol, f"relative error {err:.3g}"


SCENARIOS = {
    # (chunks, heads, kv_heads, head_dim, block_size, window)
    "prefill-gqa2": ([(0, 1), (0, 9), (0, 33), (0, 70)], 4, 2, 16, 4, None),
    "chunk-over-prefix-mha": ([(12, 7), (40, 1), (3, 20), (0, 5)], 2, 2, 32, 16, None),
    "mixed-gqa4-window": ([(30, 1), (9, 14), (70, 3), (0, 22)], 8, 2, 16, 8, 11),
    "prefill-mqa-group3-dim24": ([(5, 17), (0, 40)], 3, 1, 24, 4, None),
    "decode-long-window": ([(150, 1), (7, 1), (95, 1)], 4, 2, 16, 16, 40),
    # three leading decodes get their own decode-tile launch (split-KV), the rest prefill tiles
    "decodes-then-prefill": ([(40, 1), (7, 1), (90, 1), (12, 9), (0, 30), (25, 1)], 4, 2, 16, 4, None),
    # more leading decodes than a prefill tile has query tokens (32 here): the prefill launch starts past block 0
    "many-decodes-then-prefill": ([((7 * i) % 23, 1) for i in range(40)] + [(12, 9), (0, 45)], 8, 2, 16, 8, None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_backend_matches_reference(name: str, device: str) -> None:
    chunks, heads, kv_heads, dim, block, window = SCENARIOS[name]
    case = make_case(chunks, heads, kv_heads, dim, block, seed=len(name), device=device)
    scale = dim**-0.5
    ref_out, ref_cache = reference(case, scale, window)
    cache = case.kv_cache.clone()
    out = TritonAttentionBackend(device).forward(case.q, case.k, case.v, cache, case.meta, scale, window)
    assert_rows_close(out, ref_out, case.meta.query_start_loc_cpu[-1], torch.float32)
    assert torch.equal(cache.cpu().isnan(), ref_cache.isnan()), "KV written at the wrong slots"
    assert torch.equal(cache.cpu().nan_to_num(), ref_cache.nan_to_num())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_decode_split_kv(num_splits: int | None, device: str) -> None:
    """Flash-decoding: any number of key-range splits (empty ones included) reduces to the same result."""
    chunks = [(200, 1), (1, 1), (64, 1), (129, 1), (0, 1)]
    case = make_case(chunks, 8, 2, 16, 16, seed=11, device=device)
    ref_out, _ = reference(case, 0.25, None)
    write_kv_cache(case.k, case.v, case.kv_cache, case.meta.slot_mapping, impl="triton")
    m = case.meta
    out = torch.full_like(case.q, float("nan"))
    paged_attention(case.q, case.kv_cache, m.query_start_loc, m.seq_lens, m.block_tables, 0.25, decode=True,
                    num_splits=num_splits, out=out, impl="triton")
    assert_rows_close(out, ref_out, m.num_tokens, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_graph_padding_is_inert(device: str) -> None:
    """Padding rows and zero-length padding sequences (as a replayed CUDA graph has them) change nothing."""
    chunks = [(20, 1), (3, 1), (47, 1)]
    case = make_case(chunks, 4, 2, 16, 4, seed=5, device=device, pad_tokens=5, pad_seqs=5)
    ref_out, ref_cache = reference(case, 0.3, None)
    cache = case.kv_cache.clone()
    m = case.meta
    m.max_query_len = 1
    out = TritonAttentionBackend(device).forward(case.q, case.k, case.v, cache, m, 0.3, None)
    assert_rows_close(out, ref_out, 3, torch.float32)
    assert torch.equal(cache.cpu().isnan(), ref_cache.isnan()), "a padding token wrote K/V"


@pytest.mark.parametrize("device", DEVICES)
def test_fused_rotary_store_equals_rotary_then_forward(device: str) -> None:
    chunks = [(6, 5), (0, 9), (13, 1)]
    case = make_case(chunks, 4, 2, 16, 4, seed=3, device=device)
    inv_freq = 1.0 / (500.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    cos_sin = build_cos_sin_cache(inv_freq, 1.0, 64, device)
    rq, rk = rotary_torch(case.q, case.k, case.meta.positions, cos_sin)
    ref_out, ref_cache = reference(Case(rq, rk, case.v, case.kv_cache, case.meta), 0.25, None)
    q, k, cache = case.q.clone(), case.k.clone(), case.kv_cache.clone()
    out = TritonAttentionBackend(device).forward_rotary(q, k, case.v, case.meta.positions, cos_sin, cache,
                                                       case.meta, 0.25, None)
    assert_rows_close(out, ref_out, case.meta.num_tokens, torch.float32)
    assert torch.allclose(cache.cpu().nan_to_num(), ref_cache.nan_to_num(), atol=1e-5)
    assert torch.equal(cache.cpu().isnan(), ref_cache.isnan())


def test_decode_num_splits_fills_the_gpu() -> None:
    assert decode_num_splits(1, 8, 132) == 16  # capped
    assert decode_num_splits(8, 8, 132) == 5
    assert decode_num_splits(64, 8, 132) == 1
    assert decode_num_splits(256, 8, 132) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize(("decode", "num_seqs"), [(False, 0), (True, 6), (True, 64)],
                         ids=["prefill", "decode-split", "decode-unsplit"])
def test_bf16_llama8b_shape_on_gpu(decode: bool, num_seqs: int) -> None:
    """Llama-3-8B attention shape (32 heads, 8 KV heads, head_dim 128, block 16) in bf16, compiled; decode both
    split-KV (6 sequences) and unsplit (64: its own 32-key tiles, ``_launch_config(split_kv=False)``)."""
    chunks = [(500, 1)] * num_seqs if decode else [(0, 300), (200, 77), (0, 129)]
    case = make_case(chunks, 32, 8, 128, 16, seed=1, device="cuda", dtype=torch.bfloat16)
    ref_out, _ = reference(case, 128**-0.5, None)
    cache = case.kv_cache.clone()
    case.meta.max_query_len = 1 if decode else case.meta.max_query_len
    out = TritonAttentionBackend("cuda").forward(case.q, case.k, case.v, cache, case.meta, 128**-0.5, None)
    assert_rows_close(out, ref_out, case.meta.num_tokens, torch.bfloat16)


@pytest.mark.slow
@pytest.mark.parametrize(("decode", "split_kv"), [(False, False), (True, True), (True, False)],
                         ids=["prefill", "decode", "decode-unsplit"])
def test_compiles_for_hopper_without_spills(decode: bool, split_kv: bool, tmp_path: Path) -> None:
    """Compile the bf16 attention kernel for sm_90 on this machine (Triton frontend + the bundled ptxas; no GPU
    needed) with the Llama-8B launch shape: prefill tiles must use wgmma, loads must be pipelined with
    cp.async, and nothing may spill to local memory."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from hetserve.kernels import attention as attn

    cfg = attn._launch_config(4, 128, decode, torch.bfloat16, split_kv=split_kv)
    consts = {"GROUP": 4, "GROUP_P2": 4, "HEAD_DIM": 128, "HEAD_DIM_P2": 128, "BLOCK_Q": cfg["BLOCK_Q"],
              "BLOCK_N": cfg["BLOCK_N"], "PAGE": 16, "SPLIT_KV": split_kv, "USE_WINDOW": False, "IEEE": False}
    pointer_types = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "out_ptr": "*bf16", "part_out_ptr": "*fp32",
                     "part_lse_ptr": "*fp32", "qsl_ptr": "*i32", "seq_lens_ptr": "*i32", "block_tables_ptr": "*i32"}
    names = list(inspect.signature(attn._paged_attention.fn).parameters)
    signature = {n: "constexpr" if n in consts else pointer_types.get(n, "fp32" if n == "scale_log2" else "i32")
                 for n in names}
    # what the runtime specialises: 16-byte aligned data pointers, strides divisible by 16
    aligned = {"q_ptr", "kv_ptr", "out_ptr", "part_out_ptr", "part_lse_ptr", "stride_qt", "stride_qh", "stride_ot",
               "stride_oh", "stride_kv_side", "stride_kv_block", "stride_kv_tok", "stride_kv_head"}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in aligned}
    src = ASTSource(triton.jit(attn._paged_attention.fn), signature, {(names.index(k),): v for k, v in consts.items()},
                    attrs)
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    except Exception as e:  # noqa: BLE001 - no CUDA backend or ptxas in this triton install
        pytest.skip(f"cannot compile for sm_90 here: {e!r}"[:200])
    ptx = kernel.asm["ptx"]
    assert "cp.async" in ptx
    assert ("wgmma" in ptx) == (not decode)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        cubin = tmp_path / "attn.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)], capture_output=True,
                               text=True, check=False).stdout
        assert "STACK:0 " in usage and "LOCAL:0 " in usage, f"register spills: {usage.strip()[-200:]}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["decodes-then-prefill", "decode-long-window", "mixed-gqa4-window"])
def test_one_plan_serves_every_layer_of_a_step(name: str, device: str) -> None:
    """The backend binds a step's attention once (``PagedAttentionPlan``) and runs it for each layer's cache:
    three layers with different caches each match the reference; on a GPU the later layers go through the
    compiled kernels' launchers directly, and a plan with that path turned off gives identical bits."""
    import hetserve.kernels as kernels_mod

    chunks, heads, kv_heads, dim, block, window = SCENARIOS[name]
    scale = dim**-0.5
    # every layer the same step layout (metadata), different q, k, v and cache contents (NaN slots kept)
    base = make_case(chunks, heads, kv_heads, dim, block, seed=7, device=device)
    cases = [Case(base.q * (1 + 0.5 * layer), base.k - layer, base.v * (1 - 0.3 * layer),
                  base.kv_cache * (1 + 0.2 * layer) + 0.1 * layer, base.meta) for layer in range(3)]
    meta = base.meta
    backend = TritonAttentionBackend(device)
    n = meta.query_start_loc_cpu[-1]
    outs = []
    for case in cases:
        ref_out, _ = reference(case, scale, window)
        write_kv_cache(case.k, case.v, case.kv_cache, meta.slot_mapping, impl="triton")
        out = torch.full_like(case.q, float("nan"))
        got = backend.attend(case.q, case.kv_cache, meta, scale, window, out=out)
        assert got is out
        assert_rows_close(out, ref_out, n, torch.float32)
        outs.append(out)
    assert len(backend._plans) == 1, "one plan per step layout, not one per layer"
    plan = next(iter(backend._plans.values()))
    if device == "cpu":
        assert plan.direct_runs == 0  # the interpreter has no compiled launchers
    if device == "cuda":
        assert plan.direct_runs == len(cases) - 1, "the later layers did not call the compiled launchers"
        try:
            kernels_mod.DIRECT_LAUNCH = False
            slow = TritonAttentionBackend(device)
            for case, fast_out in zip(cases, outs, strict=True):
                out = slow.attend(case.q, case.kv_cache, meta, scale, window)
                assert torch.equal(out[:n], fast_out[:n])
        finally:
            kernels_mod.DIRECT_LAUNCH = True
    # a layer with another layout cannot reuse the step's plan: it gets its own
    wide = cases[0].q.repeat(1, 2, 1)[:, : heads * 2]
    backend.attend(wide.contiguous(), cases[0].kv_cache, meta, scale, window)
    assert len(backend._plans) == 2
    with pytest.raises(ValueError, match="plan for q"):
        plan.run(wide.contiguous(), cases[0].kv_cache)
    # a new step (new metadata) drops the old plans
    backend.attend(cases[0].q, cases[0].kv_cache, make_case(chunks, heads, kv_heads, dim, block, 1, device).meta,
                   scale, window)
    assert len(backend._plans) == 1
