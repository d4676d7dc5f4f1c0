"""KV conversion against brute force: every pair of layouts, arrangements, block sizes, dtypes and TP splits,
and the composed PD case of issue 7 (prefill TP 2, bf16, NHD, block 16 -> decode TP 1, fp32, HND, block 32)."""

from __future__ import annotations

import dataclasses
import itertools
import random

import pytest
import torch

from hetserve.core.errors import ValidationError
from hetserve.runtime.kv_convert import (
    TORCH_DTYPES,
    KVPayload,
    block_major_to_layer_major,
    cast_kv,
    convert,
    convert_layout,
    layer_major_to_block_major,
    rechunk_blocks,
    reshard_heads,
    stacked_view,
)
from hetserve.runtime.kv_layout import (
    KVDescriptor,
    KVDescriptorMismatch,
    check_compatible,
    head_transfers,
    wire_descriptor,
)

from .brute import e4m3_round, fp8_reference, padding_is_zero, read_payload, write_payload

L, H, D = 2, 4, 4
DTYPES = ["float32", "bfloat16", "float16", "fp8_e4m3"]


def desc(**kw: object) -> KVDescriptor:
    base: dict[str, object] = {"num_layers": L, "num_kv_heads": H, "head_dim": D, "block_size": 16}
    base.update(kw)
    return KVDescriptor(**base)  # type: ignore[arg-type]


def truth_for(src: KVDescriptor, num_tokens: int, seed: int) -> torch.Tensor:
    """Values exactly representable in the source dtype: ``[L, 2, T, H, D]`` float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(src.num_layers, 2, num_tokens, src.num_kv_heads, src.head_dim, generator=g) * 3
    if src.dtype == "fp8_e4m3":
        return torch.tensor([e4m3_round(v) for v in x.reshape(-1).tolist()], dtype=torch.float64).reshape(x.shape)
    return x.to(TORCH_DTYPES[src.dtype]).double()


def source_pieces(truth: torch.Tensor, src: KVDescriptor, extra_blocks: int = 0) -> list:
    pieces = []
    for r in range(src.tp_size):
        d = src.for_rank(r)
        h0, h1 = d.head_range
        nb = -(-truth.shape[2] // src.block_size) + extra_blocks
        p = write_payload(truth, d, h0, h1 - h0, num_blocks=nb)
        if src.dtype == "fp8_e4m3":
            gran = 1 if src.scale_granularity == "tensor" else h1 - h0
            p.scales = torch.ones(src.num_layers, 2, gran)  # truth is exact in e4m3 at scale 1
        pieces.append(p)
    return pieces


def expected_fp8(values: torch.Tensor, granularity: str) -> torch.Tensor:
    """Dynamic-scale quantisation by definition: scale = amax / 448 per (layer, K|V[, head])."""
    out = torch.empty_like(values)
    L_, _, _, Hn, _ = values.shape
    for layer in range(L_):
        for kv in range(2):
            groups = [slice(None)] if granularity == "tensor" else [slice(h, h + 1) for h in range(Hn)]
            for g in groups:
                v = values[layer, kv, :, g]
                amax = torch.tensor(float(v.abs().max()), dtype=torch.float32)
                scale = amax / 448 if amax > 0 else torch.tensor(1.0)
                q = (v.float() / scale).double()
                ref = torch.tensor([e4m3_round(a) for a in q.reshape(-1).tolist()], dtype=torch.float64)
                out[layer, kv, :, g] = ref.reshape(v.shape) * float(scale)
    return out


def as_one_block(p: KVPayload) -> KVPayload:
    """The same payload with its layers as views of one allocation (a runner's cache, a received message):
    ``convert`` then takes its all-layers-at-once path."""
    whole = torch.stack(p.tensors)
    out = dataclasses.replace(p, tensors=list(whole.unbind(0)))
    assert stacked_view(out.tensors) is not None
    return out


def check(src: KVDescriptor, dst: KVDescriptor, num_tokens: int, seed: int = 0, exact: bool = True) -> None:
    truth = truth_for(src, num_tokens, seed)
    pieces = source_pieces(truth, src, extra_blocks=1)  # a spare block past the request: must be ignored
    before = [[t.clone() for t in p.tensors] for p in pieces]
    _check(pieces, truth, src, dst, num_tokens, exact)
    for p, b in zip(pieces, before, strict=True):  # without ``consume`` the inputs are never written
        assert all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(p.tensors, b, strict=True))
    if src.arrangement == "layer_major" and src.num_layers > 1:
        _check([as_one_block(p) for p in pieces], truth, src, dst, num_tokens, exact)
    # the caller's temporaries may be reused (a fresh copy per destination rank: each call consumes its input)
    _check(pieces, truth, src, dst, num_tokens, exact, consume=True)


def _fresh(p: KVPayload) -> KVPayload:
    return dataclasses.replace(p, tensors=[t.clone() for t in p.tensors],
                               scales=None if p.scales is None else p.scales.clone())


def _check(pieces: list, truth: torch.Tensor, src: KVDescriptor, dst: KVDescriptor, num_tokens: int,
           exact: bool, consume: bool = False) -> None:
    for r in range(dst.tp_size):
        d = dst.for_rank(r)
        h0, h1 = d.head_range
        if consume:
            out = convert([_fresh(p) for p in pieces], src, d, num_tokens, consume=True)
        else:
            out = convert(pieces, src, d, num_tokens)
        assert (out.head_start, out.head_stop) == (h0, h1)
        for f in ("dtype", "layout", "arrangement", "block_size"):
            assert getattr(out.desc, f) == getattr(dst, f)
        assert out.num_blocks == -(-num_tokens // dst.block_size)
        got = read_payload(out, num_tokens)
        want = truth[:, :, :, h0:h1]
        if dst.dtype == "fp8_e4m3" and src.dtype != "fp8_e4m3":
            want = expected_fp8(want, dst.scale_granularity)
        elif dst.dtype != "fp8_e4m3":
            want = want.to(TORCH_DTYPES[dst.dtype]).double()
        if exact:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            torch.testing.assert_close(got, want, rtol=2**-3, atol=2**-6)
        assert padding_is_zero(out, num_tokens)
        if dst.dtype == "fp8_e4m3":
            assert out.scales is not None
            assert out.scales.shape[2] == (1 if dst.scale_granularity == "tensor" else h1 - h0)


# ---- one dimension at a time, every pair ---------------------------------------------------------
@pytest.mark.parametrize("a,b", list(itertools.product(["NHD", "HND"], repeat=2)))
def test_layout_pairs(a: str, b: str) -> None:
    check(desc(layout=a), desc(layout=b), 37)


@pytest.mark.parametrize("a,b", list(itertools.product(["layer_major", "block_major"], repeat=2)))
def test_arrangement_pairs(a: str, b: str) -> None:
    check(desc(arrangement=a), desc(arrangement=b), 37)


@pytest.mark.parametrize("a,b,t", [(16, 32, 37), (32, 16, 37), (8, 16, 37), (8, 16, 3), (16, 8, 37), (16, 16, 37),
                                   (8, 32, 64), (32, 8, 1), (16, 32, 32), (5, 7, 36)])
def test_block_size_pairs(a: int, b: int, t: int) -> None:
    check(desc(block_size=a), desc(block_size=b), t)


@pytest.mark.parametrize("a,b", list(itertools.product(DTYPES, repeat=2)))
@pytest.mark.parametrize("gran", ["tensor", "head"])
def test_dtype_pairs(a: str, b: str, gran: str) -> None:
    check(desc(dtype=a, scale_granularity=gran), desc(dtype=b, scale_granularity=gran), 21)


@pytest.mark.parametrize("a,b,heads", [(1, 2, 4), (2, 1, 4), (2, 2, 4), (4, 2, 4), (2, 4, 4), (4, 1, 4), (1, 4, 4),
                                       (4, 1, 2), (1, 4, 2), (4, 2, 2)])  # heads < ranks: replicated heads
def test_tp_pairs(a: int, b: int, heads: int) -> None:
    check(desc(tp_size=a, num_kv_heads=heads), desc(tp_size=b, num_kv_heads=heads), 19)


def test_composed_issue_case() -> None:
    """Prefill TP 2, bf16, NHD, block 16 -> decode TP 1, fp32, HND, block 32 (exact: widening only)."""
    src = desc(tp_size=2, dtype="bfloat16", layout="NHD", block_size=16)
    dst = desc(tp_size=1, dtype="float32", layout="HND", block_size=32)
    assert check_compatible(src, dst) == ["tp", "dtype", "block_size", "layout"]
    for t in (1, 16, 17, 32, 33, 50):
        check(src, dst, t, seed=t)


def test_composed_reverse_and_fp8() -> None:
    check(desc(tp_size=1, dtype="float32", layout="HND", block_size=32),
          desc(tp_size=2, dtype="bfloat16", layout="NHD", block_size=16, arrangement="block_major"), 45)
    check(desc(tp_size=2, dtype="bfloat16", block_size=16),
          desc(tp_size=1, dtype="fp8_e4m3", layout="HND", block_size=32, scale_granularity="head"), 45)


def test_random_combinations() -> None:
    rng = random.Random(7)
    for i in range(24):
        heads = rng.choice([2, 4])

        def pick(heads: int = heads) -> KVDescriptor:
            return desc(num_kv_heads=heads, tp_size=rng.choice([1, 2, 4]), dtype=rng.choice(DTYPES),
                        layout=rng.choice(["NHD", "HND"]), arrangement=rng.choice(["layer_major", "block_major"]),
                        block_size=rng.choice([4, 8, 16, 32]), scale_granularity=rng.choice(["tensor", "head"]))

        src, dst = pick(), pick()
        check(src, dst, rng.randint(1, 70), seed=i)


# ---- the single steps against loops --------------------------------------------------------------
def test_convert_layout_by_loops() -> None:
    x = torch.randn(2, 3, 5, 4, 6)
    y = convert_layout(x, "NHD", "HND")
    for kv, b, s, h in itertools.product(range(2), range(3), range(5), range(4)):
        assert torch.equal(y[kv, b, h, s], x[kv, b, s, h])
    assert torch.equal(convert_layout(y, "HND", "NHD"), x)


def test_arrangement_by_loops() -> None:
    layers = [torch.randn(2, 3, 5, 4, 6) for _ in range(3)]
    bm = layer_major_to_block_major(layers)
    assert bm.shape == (3, 3, 2, 5, 4, 6)
    for b, layer, kv in itertools.product(range(3), range(3), range(2)):
        assert torch.equal(bm[b, layer, kv], layers[layer][kv, b])
    back = block_major_to_layer_major(bm)
    assert all(torch.equal(a, b) for a, b in zip(back, layers, strict=True))


@pytest.mark.parametrize("src_bs,dst_bs,n", [(16, 32, 37), (32, 16, 37), (8, 16, 20), (16, 16, 9)])
@pytest.mark.parametrize("src_layout,dst_layout", [("NHD", "NHD"), ("HND", "NHD"), ("NHD", "HND"), ("HND", "HND")])
def test_rechunk_by_loops(src_bs: int, dst_bs: int, n: int, src_layout: str, dst_layout: str) -> None:
    nb = -(-n // src_bs) + 1
    shape = (2, nb, src_bs, 3, 4) if src_layout == "NHD" else (2, nb, 3, src_bs, 4)
    x = torch.randn(shape)
    y = rechunk_blocks(x, n, dst_bs, src_layout, dst_layout)  # type: ignore[arg-type]
    assert y.shape[1] == -(-n // dst_bs)
    for kv, p, h in itertools.product(range(2), range(y.shape[1] * dst_bs), range(3)):
        sb, ss = divmod(p, src_bs)
        db, ds = divmod(p, dst_bs)
        got = y[kv, db, ds, h] if dst_layout == "NHD" else y[kv, db, h, ds]
        if p < n:
            want = x[kv, sb, ss, h] if src_layout == "NHD" else x[kv, sb, h, ss]
            assert torch.equal(got, want)
        else:
            assert not got.any()


def test_reshard_heads_2_to_1_and_1_to_2() -> None:
    full = torch.randn(2, 2, 3, 5, 4, 6)  # [L, 2, B, bs, H, D]
    a, b = full[..., :2, :], full[..., 2:, :]
    assert torch.equal(reshard_heads([(2, b), (0, a)], 0, 4, -2), full)
    assert torch.equal(reshard_heads([(0, full)], 2, 4, -2), b)
    assert torch.equal(reshard_heads([(0, a), (2, b)], 1, 3, -2), full[..., 1:3, :])
    with pytest.raises(ValueError, match="heads"):
        reshard_heads([(0, a)], 0, 4, -2)


def test_fp8_cast_matches_reference_rounding_and_clamps() -> None:
    x = torch.randn(2, 2, 3, 8, 2, 4) * 10
    x[0, 0, 0, 0, 0, 0] = 1e4  # an outlier past 448 * scale: clamped, not NaN
    scales = torch.tensor([[[0.5], [2.0]], [[1.0], [0.25]]])
    q, s = cast_kv(x, "float32", "fp8_e4m3", -2, dst_scales=scales)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(s, scales)
    for layer, kv in itertools.product(range(2), range(2)):
        sc = float(scales[layer, kv, 0])
        want = fp8_reference(x[layer, kv], sc)
        torch.testing.assert_close(q[layer, kv].double() * sc, want, rtol=0, atol=0)
    assert float(q[0, 0, 0, 0, 0, 0].float()) == 448.0
    back, none = cast_kv(q, "fp8_e4m3", "float32", -2, src_scales=scales)
    assert none is None and back.dtype == torch.float32


@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_fp8_round_trip_error_bound(granularity: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 4, 16, 4, 8, generator=g) * torch.tensor([0.01, 1.0, 30.0, 500.0]).view(4, 1)
    q, s = cast_kv(x, "float32", "fp8_e4m3", -2, granularity=granularity)
    assert s is not None and s.shape == (2, 2, 1 if granularity == "tensor" else 4)
    y, _ = cast_kv(q, "fp8_e4m3", "float32", -2, src_scales=s)
    sv = s.view(2, 2, 1, 1, -1, 1)
    # 3 mantissa bits: relative error <= 2^-4 for normals; absolute <= half the smallest subnormal step below
    bound = torch.maximum(x.abs() * 2**-4, sv * 2**-10) * (1 + 1e-6)
    assert ((y - x).abs() <= bound).all()
    if granularity == "head":  # per-head scales keep small heads accurate next to large ones
        rel = ((y - x).abs() / x.abs().clamp_min(1e-30))[..., 0, :]
        assert rel.median() < 2**-4


# ---- descriptors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("num_layers", 3), ("head_dim", 8), ("num_kv_heads", 8),
                                         ("model_id", "other")])
def test_mismatch_names_the_field(field: str, value: object) -> None:
    a = desc(model_id="m")
    b = dataclasses.replace(a, **{field: value})
    with pytest.raises(KVDescriptorMismatch) as ei:
        check_compatible(a, b)
    assert ei.value.field == field and field in str(ei.value)
    pieces = source_pieces(truth_for(a, 5, 0), a)
    with pytest.raises(KVDescriptorMismatch, match=field):
        convert(pieces, a, b, 5)


def test_invalid_descriptor_names_the_field() -> None:
    with pytest.raises(ValidationError, match="tp_size"):
        desc(num_kv_heads=6, tp_size=4)
    with pytest.raises(ValidationError, match="dtype"):
        desc(dtype="int8")
    with pytest.raises(ValidationError, match="tp_rank"):
        desc(tp_size=2, tp_rank=2)


def test_head_transfers_cover_each_destination_once() -> None:
    for heads, a, b in [(4, 2, 1), (4, 1, 2), (4, 4, 2), (2, 4, 1), (2, 1, 4), (8, 4, 8)]:
        src, dst = desc(num_kv_heads=heads, tp_size=a), desc(num_kv_heads=heads, tp_size=b)
        plan = head_transfers(src, dst)
        for d in range(b):
            got = sorted((lo, hi) for s, dd, lo, hi in plan if dd == d)
            covered = [h for lo, hi in got for h in range(lo, hi)]
            assert covered == list(range(*dst.heads_of_rank(d)))
            for s, dd, lo, hi in plan:
                s0, s1 = src.heads_of_rank(s)
                assert s0 <= lo < hi <= s1


@pytest.mark.parametrize("a,b", list(itertools.product(DTYPES, repeat=2)))
def test_wire_carries_the_narrower_dtype(a: str, b: str) -> None:
    src, dst = desc(dtype=a, tp_size=2), desc(dtype=b, block_size=32, layout="HND")
    wire = wire_descriptor(src, dst)
    n = 128  # whole blocks on every side, so only the dtype decides
    assert wire.payload_bytes(n, 2) <= min(src.payload_bytes(n, 2), dst.for_rank(0).payload_bytes(n, 2))
    assert (wire.block_size, wire.layout, wire.arrangement) == (32, "HND", "layer_major")


def test_fp8_shards_with_different_scales_join() -> None:
    src = desc(dtype="fp8_e4m3", tp_size=2)
    truth = truth_for(src, 20, 1)
    pieces = source_pieces(truth, src)
    pieces[1].scales = torch.full((L, 2, 1), 0.25)  # shard 1 (heads 2, 3) stores its values at scale 0.25
    want = truth.clone()
    want[:, :, :, 2:] *= 0.25
    wide = convert(pieces, src, desc(dtype="float32"), 20)
    torch.testing.assert_close(read_payload(wide, 20), want, rtol=0, atol=0)
    per_head = convert(pieces, src, desc(dtype="fp8_e4m3", scale_granularity="head"), 20)
    torch.testing.assert_close(read_payload(per_head, 20), want, rtol=0, atol=0)
    one_scale = convert(pieces, src, desc(dtype="fp8_e4m3"), 20)  # needs one scale per tensor: requantised
    assert one_scale.scales is not None and one_scale.scales.shape == (L, 2, 1)
    assert torch.equal(one_scale.scales, torch.ones(L, 2, 1))
    got = read_payload(one_scale, 20)
    assert ((got - want).abs() <= torch.maximum(want.abs() * 2**-4, torch.tensor(2**-10))).all()


def test_stacked_view_only_for_equally_spaced_views_of_one_block() -> None:
    whole = torch.arange(3 * 2 * 5, dtype=torch.float32).reshape(3, 2, 5)
    st = stacked_view(list(whole.unbind(0)))
    assert st is not None and torch.equal(st, whole)
    assert stacked_view([whole[0], whole[2]]) is not None  # equally spaced, step of two layers
    assert torch.equal(stacked_view([whole[0], whole[2]]), whole[::2])  # type: ignore[arg-type]
    assert stacked_view([whole[0], whole[2], whole[1]]) is None  # out of order
    assert stacked_view([whole[0].clone(), whole[1]]) is None  # two storages
    assert stacked_view([whole[0][:, :3], whole[1][:, :3]]) is None  # not contiguous
    assert stacked_view([whole[1], whole[0]]) is None  # negative step


def test_layer_views_remember_their_block_until_changed() -> None:
    from hetserve.engine.kv_views import LayerViews
    from hetserve.runtime.kv_transfer import extract_blocks

    whole = torch.arange(4 * 2 * 5, dtype=torch.float32).reshape(4, 2, 5)
    views = LayerViews(whole)
    assert stacked_view(views) is whole  # no per-layer check: the block it was made from
    assert [t.data_ptr() for t in views] == [t.data_ptr() for t in whole.unbind(0)]
    views[0] = whole[0].clone()  # replaced: no longer intact, so the views are checked one by one
    assert not views.intact() and stacked_view(views) is None
    grown = LayerViews(whole)
    grown.append(whole[0])
    assert not grown.intact() and stacked_view(grown) is None  # out of order now
    # the extract -> convert path hands the stacked tensor on: the converted payload is LayerViews too
    d = desc()
    cache = LayerViews(torch.randn(d.num_layers, 2, 6, d.block_size, d.num_kv_heads, d.head_dim))
    src = extract_blocks(cache, [4, 1], d.block_size + 3, d)
    assert isinstance(src.tensors, LayerViews)
    out = convert(src, d, dataclasses.replace(d, layout="HND", block_size=d.block_size * 2), d.block_size + 3)
    assert isinstance(out.tensors, LayerViews) and stacked_view(out.tensors) is out.tensors.whole
