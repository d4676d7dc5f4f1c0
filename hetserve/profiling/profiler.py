"""``hetserve profile``: measure one device (a whole GPU, a partition of one, or a CPU) for one model shape.

What is measured, on a model of ``num_layers`` layers (1-8) with the model's per-layer shapes and random
weights (a profile is per layer, and ``model_shape_hash`` ignores the layer count, so this is valid):

* ``dense_s_per_layer``: the model's forward with an attention backend that does nothing (no KV read or
  write), divided by the layer count. It therefore also carries the embedding gather and the final norm,
  each under 0.1% of a layer for 8B-class shapes.
* ``decode_attn_s_per_layer`` / ``prefill_attn_s_per_layer``: one layer's attention backend call (the
  engine's own backend, its KV write included) on a paged cache holding random values, for a batch of
  ``num_seqs`` decode rows of ``context_len`` cached tokens, or one chunk of ``num_tokens`` new tokens after
  ``context_len`` cached ones. Where the batch's KV exceeds the pool, block tables wrap around the pool; the
  reuse distance is the pool size, far beyond L2. The backend's plain ``forward`` is timed; a backend that
  fuses rotary into its KV write in the model's fast path does the same work there, and the dense table
  (whose no-op attention leaves rotary to the model) then holds the rotary kernel. On a CPU the prefill table
  is instead attention's share of the model's forward (paired forwards with and without it, median
  difference): there a long chunk's temporaries come from the allocator as fresh pages, as in the engine.
* ``lm_head_s``: final norm, LM head and a greedy argmax for ``num_tokens`` rows (logits in the activation
  dtype where the model offers it, as the runner's greedy path does).
* ``copy_bytes_per_s``: a large device copy, read + write bytes over time.
* host terms (``hetserve.profiling.host``), through the engine around this runner: ``step_overhead_s`` (a
  decode step of one request minus its table parts), ``step_overhead_per_seq_s``, ``new_seq_overhead_s`` /
  ``new_seq_overhead_per_token_s`` (a new request's admission and first step beyond the tables) and the
  ``idle_wake_s`` table (a step after the engine slept ``idle_s``), all clamped at 0.
* ``kv_bytes_per_token``: for the full model (all its layers), from its shapes and the KV dtype.

GPU timings are CUDA events around each call, on the partition's stream if there is one; each call is
replayed from a CUDA graph when it can be captured (fewer launch gaps, as the engine's decode graphs),
else run eagerly; the mode of each table is in ``meta.timing``. CPU timings are wall clock. Every number is
the median (GPU) or minimum (CPU, where other processes only add time) of ``repeat`` calls after
``warmup`` calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from hetserve.core.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.engine.attention import AttentionBackend, AttentionMetadata
from hetserve.planner.profile import DeviceProfile, SkewTable, Table1D, Table2D, model_shape_hash
from hetserve.profiling.grid import _TORCH_DTYPES, ProfileGrid, ProfileOptions, canonical_torch_dtype
from hetserve.profiling.host import HostCosts, measure_host_costs
from hetserve.profiling.synthetic import NoAttention, build_metadata, truncated_config
from hetserve.profiling.timing import Timer, mode_delta, nullcontext_

Log = Callable[[str], None]

# dense-table token counts at or below this are timed as a decode batch (one token per sequence)
DENSE_DECODE_SHAPE_MAX = 512

__all__ = ["DENSE_DECODE_SHAPE_MAX", "ProfileGrid", "ProfileOptions", "Profiler", "canonical_torch_dtype"]

# ---------------------------------------------------------------------------------------------- the profiler


@dataclass
class _Tables:
    dense: dict[int, float] = field(default_factory=dict)
    decode: dict[int, list[float]] = field(default_factory=dict)
    prefill: dict[int, list[float]] = field(default_factory=dict)
    lm_head: dict[int, float] = field(default_factory=dict)
    # decode over uneven contexts: num_seqs -> (slope, max / mean), at skew_context mean context
    skew: dict[int, tuple[float, float]] = field(default_factory=dict)
    skew_context: int = 0


# the longest context of an uneven decode batch over its mean, as online batches have it (Azure-conv prompts
# capped at 2048 plus decoded tokens: 1.7-2.4, median ~2.2; results/engine-s6/gpu-attn-skew.json)
SKEW_MAX_OVER_MEAN = 2.2


def skewed_contexts(num_seqs: int, mean: int) -> list[int]:
    """``num_seqs`` decode contexts with mean ``mean``, spread like an online batch: the quantiles of an
    exponential distribution clipped where the largest is ``SKEW_MAX_OVER_MEAN`` times the mean (1.87)."""
    clip = 1.87  # clip / (1 - exp(-clip)) = 2.2: the clipped exponential's max over its mean
    raw = [min(clip, -math.log(1.0 - (i + 0.5) / num_seqs)) for i in range(num_seqs)]
    scale = mean * num_seqs / sum(raw)
    return [max(1, round(r * scale)) for r in raw]


class Profiler:
    """Measures one device for one model shape; :meth:`run` returns the :class:`DeviceProfile`."""

    def __init__(
        self,
        model_config: ModelConfig,
        *,
        device: str = "cuda",
        dtype: str = "auto",
        grid: ProfileGrid | None = None,
        options: ProfileOptions | None = None,
        stream: Any = None,
        log: Log | None = None,
    ) -> None:
        self.full_config = model_config
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValidationError("--device", "cuda asked for, but torch sees no CUDA GPU here")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.dtype_name = canonical_torch_dtype(dtype, self.device.type)
        self.dtype = _TORCH_DTYPES[self.dtype_name]
        self.grid = grid or ProfileGrid.default(self.device.type)
        self.options = options or ProfileOptions()
        self.cfg = truncated_config(model_config, self.options.num_layers)
        self.num_layers = self.cfg.num_hidden_layers
        if stream is None and self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)  # graphs cannot be captured on the legacy default stream
        self.stream = stream
        self.log: Log = log or (lambda _msg: None)
        self.timer = Timer(self.device, stream, self.options.warmup, self.options.repeat, self.options.use_cuda_graphs,
                           self.options.statistic)
        self.timing: dict[str, str] = {}
        self.truncated: dict[str, str] = {}
        self.validation: list[dict[str, Any]] = []
        self._pool = 2

    # ---- setup ----------------------------------------------------------------------------------
    def _kv_bytes_per_block(self) -> int:
        c = self.cfg
        return 2 * self.options.block_size * c.num_key_value_heads * c.head_dim * self.dtype.itemsize * self.num_layers

    def _pool_blocks(self) -> int:
        g, bs = self.grid, self.options.block_size
        need_decode = max(g.decode_num_seqs) * math.ceil((max(g.decode_context_lens) + 1) / bs)
        need_prefill = math.ceil((max(g.prefill_num_tokens) + max(g.prefill_context_lens)) / bs)
        need = max(need_decode, need_prefill, math.ceil(max(g.dense_num_tokens) / bs)) + 1
        budget = self.options.kv_pool_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = min(int(0.35 * free), 24 * 2**30)
            else:
                budget = 256 * 2**20
        return max(2, min(need, budget // self._kv_bytes_per_block()))

    def _make_runner(self, model: torch.nn.Module, num_blocks: int, path_hint: str) -> Any:
        from hetserve.engine.runner import ModelRunner

        dev_kw: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(DeviceConfig)}
        if "enforce_eager" in names:
            dev_kw["enforce_eager"] = not self.options.use_cuda_graphs
        if "cuda_graph_max_batch" in names:
            dev_kw["cuda_graph_max_batch"] = 8  # graphs for the batch-1 overhead and the small checks only
        cfg = EngineConfig(
            model=path_hint,
            cache=CacheConfig(block_size=self.options.block_size, num_blocks=num_blocks, enable_prefix_caching=False),
            scheduler=SchedulerConfig(),
            device=DeviceConfig(device=str(self.device), dtype=self.dtype_name,  # type: ignore[arg-type]
                                attention_backend=self.options.attention_backend, seed=self.options.seed, **dev_kw),
        )
        return ModelRunner(cfg, model=model, model_config=self.cfg)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.stream.synchronize()

    # ---- tables ---------------------------------------------------------------------------------
    def _over_budget(self, t0: float, table: str, done: int, total: int) -> bool:
        if time.perf_counter() - t0 <= self.options.table_budget_s or done == 0:
            return False
        budget = self.options.table_budget_s
        self.truncated[table] = f"stopped after {done} of {total} outer grid points ({budget:g} s budget)"
        self.log(f"  {table}: {self.truncated[table]}")
        return True

    def _measure_dense(self, model: Any, kv_caches: list[torch.Tensor], tables: _Tables) -> None:
        none = NoAttention(self.device)
        t0 = time.perf_counter()
        before = dict(self.timer.modes)
        for i, n in enumerate(self.grid.dense_num_tokens):
            if self._over_budget(t0, "dense_s_per_layer", i, len(self.grid.dense_num_tokens)):
                break
            n_eff = max(1, n)
            ids = torch.arange(n_eff, device=self.device) % (self.cfg.vocab_size - 10) + 10  # no global RNG after graph captures
            # up to a decode batch the engine runs these tokens as n one-token sequences from a CUDA graph: time
            # them in that shape (capturable); larger counts as one prefill chunk (launch gaps are amortised)
            seqs = [(1, 0)] * n_eff if n_eff <= DENSE_DECODE_SHAPE_MAX else [(n_eff, 0)]
            meta = build_metadata(seqs, self.options.block_size, self.device, self._pool)
            t = self.timer(functools.partial(model, ids, meta.positions, kv_caches, meta, none))
            tables.dense[n] = t / self.num_layers
        self.timing["dense_s_per_layer"] = mode_delta(before, self.timer.modes)

    def _attn_call(self, backend: AttentionBackend, kv: torch.Tensor, meta: AttentionMetadata,
                   window: int | None) -> Callable[[], Any]:
        c = self.cfg
        g = torch.Generator(device=self.device).manual_seed(self.options.seed)
        n = meta.num_tokens
        q = torch.randn(n, c.num_attention_heads, c.head_dim, device=self.device, dtype=self.dtype, generator=g)
        k = torch.randn(n, c.num_key_value_heads, c.head_dim, device=self.device, dtype=self.dtype, generator=g)
        v = torch.randn(n, c.num_key_value_heads, c.head_dim, device=self.device, dtype=self.dtype, generator=g)
        scale = c.head_dim**-0.5
        return lambda: backend.forward(q, k, v, kv, meta, scale, window)

    def _prefill_in_model_s(self, model: Any, kv_caches: list[torch.Tensor], backend: AttentionBackend,
                            meta: AttentionMetadata) -> float:
        """One layer's attention inside the model's forward: a forward with ``backend`` minus one with no
        attention, paired call by call, median of the differences, over the layers. On a CPU this is where
        the engine runs it: a long chunk's temporaries (MBs of scores) are fresh pages from the allocator
        between the model's other tensors, page faults and all, which a loop over the backend alone does not
        see (it reuses its own freed blocks)."""
        ids = torch.arange(meta.num_tokens, device=self.device) % (self.cfg.vocab_size - 10) + 10
        full = functools.partial(model, ids, meta.positions, kv_caches, meta, backend)
        bare = functools.partial(model, ids, meta.positions, kv_caches, meta, NoAttention(self.device))
        for _ in range(self.options.warmup):
            full()
            bare()
        diffs = []
        for _ in range(self.options.repeat):
            t0 = time.perf_counter()
            full()
            t1 = time.perf_counter()
            bare()
            diffs.append((t1 - t0) - (time.perf_counter() - t1))
        self.timer.modes["wall-in-model"] = self.timer.modes.get("wall-in-model", 0) + 1
        return max(0.0, statistics.median(diffs)) / self.num_layers

    def _measure_attention(self, backend: AttentionBackend, kv: torch.Tensor, window: int | None,
                           tables: _Tables, model: Any = None, kv_caches: list[torch.Tensor] | None = None) -> None:
        bs, pool = self.options.block_size, self._pool
        g = self.grid
        t0 = time.perf_counter()
        before = dict(self.timer.modes)
        for i, b in enumerate(g.decode_num_seqs):
            if self._over_budget(t0, "decode_attn_s_per_layer", i, len(g.decode_num_seqs)):
                break
            row = []
            for ctx in g.decode_context_lens:
                meta = build_metadata([(1, ctx)] * b, bs, self.device, pool)
                row.append(self.timer(self._attn_call(backend, kv, meta, window)))
            tables.decode[b] = row
        self.timing["decode_attn_s_per_layer"] = mode_delta(before, self.timer.modes)
        # the same batches with uneven contexts (profile.SkewTable), beside even ones of the same mean
        fits = [c for c in g.decode_context_lens if SKEW_MAX_OVER_MEAN * c <= max(g.decode_context_lens)]
        if fits:
            ctx = min(fits, key=lambda c: abs(c - 1024))
            tables.skew_context = ctx
            for b in g.decode_num_seqs:
                if b < 2 or b not in tables.decode:
                    continue
                ctxs = skewed_contexts(b, ctx)
                mean = sum(ctxs) / b
                uneven = self.timer(self._attn_call(backend, kv, build_metadata([(1, c) for c in ctxs], bs,
                                                                                   self.device, pool), window))
                even = self.timer(self._attn_call(backend, kv, build_metadata([(1, round(mean))] * b, bs,
                                                                                 self.device, pool), window))
                ratio = max(ctxs) / mean
                tables.skew[b] = ((uneven / even - 1.0) / (ratio - 1.0) if even > 0 else 0.0, ratio)
        t0 = time.perf_counter()
        before = dict(self.timer.modes)
        for i, n in enumerate(g.prefill_num_tokens):
            if self._over_budget(t0, "prefill_attn_s_per_layer", i, len(g.prefill_num_tokens)):
                break
            row = []
            for ctx in g.prefill_context_lens:
                meta = build_metadata([(max(1, n), ctx)], bs, self.device, pool)
                if self.device.type == "cpu" and model is not None and kv_caches is not None:
                    row.append(self._prefill_in_model_s(model, kv_caches, backend, meta))
                else:
                    row.append(self.timer(self._attn_call(backend, kv, meta, window)))
            tables.prefill[n] = row
        self.timing["prefill_attn_s_per_layer"] = mode_delta(before, self.timer.modes)

    def _measure_lm_head(self, model: Any, tables: _Tables) -> None:
        t0 = time.perf_counter()
        before = dict(self.timer.modes)
        norm = model.model.norm
        try:  # the runner's greedy path takes an argmax of logits in the activation dtype
            model.compute_logits(torch.zeros(1, self.cfg.hidden_size, device=self.device, dtype=self.dtype),
                                 float32=False)
            kw: dict[str, Any] = {"float32": False}
        except TypeError:
            kw = {}
        for i, r in enumerate(self.grid.lm_head_rows):
            if self._over_budget(t0, "lm_head_s", i, len(self.grid.lm_head_rows)):
                break
            h = torch.ones(max(1, r), self.cfg.hidden_size, device=self.device, dtype=self.dtype)  # values don't matter
            def logits_argmax(h: torch.Tensor = h) -> torch.Tensor:
                return model.compute_logits(norm(h), **kw).argmax(dim=-1)

            tables.lm_head[r] = self.timer(logits_argmax)
        self.timing["lm_head_s"] = mode_delta(before, self.timer.modes)

    def measure_copy_bytes_per_s(self) -> float:
        nbytes = self.options.copy_bytes or (2**30 if self.device.type == "cuda" else 128 * 2**20)
        with torch.cuda.stream(self.stream) if self.device.type == "cuda" else nullcontext_():
            x = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).normal_(generator=_private_gen(self.device))
            y = torch.empty_like(x)
            t = self.timer(functools.partial(y.copy_, x), graph=False)
        return 2 * nbytes / t

    # ---- the whole run ----------------------------------------------------------------------------
    def run(
        self,
        *,
        device_name: str,
        model_name: str,
        emulation: str | None = None,
        meta: dict[str, Any] | None = None,
        path_hint: str = "profile-model",
    ) -> DeviceProfile:
        from hetserve.engine.model.llama import layer_sliding_windows
        from hetserve.engine.model.loader import init_random_model

        t_start = time.perf_counter()
        load_start = _load_average()
        torch.manual_seed(self.options.seed)
        tables = _Tables()
        ctx = torch.cuda.stream(self.stream) if self.device.type == "cuda" else nullcontext_()
        with ctx, torch.inference_mode():
            self.log(f"model: {self.num_layers} layer(s) of {model_name} shape, {self.dtype_name}, on {self.device}")
            model = init_random_model(self.cfg, self.device, self.dtype, seed=self.options.seed)
            num_blocks = self._pool_blocks()
            runner = self._make_runner(model, num_blocks, path_hint)
            self._pool = int(runner.num_kv_blocks)
            kv_caches = runner.kv_caches
            for kv in kv_caches:
                kv.normal_(generator=_private_gen(self.device))  # timing on zeros flatters some kernels
            self._sync()
            backend_name = getattr(runner.backend, "name", type(runner.backend).__name__)
            self.log(f"attention backend: {backend_name}; "
                     f"KV pool {runner.num_kv_blocks} blocks of {self.options.block_size}")
            self.log("dense ...")
            self._measure_dense(model, kv_caches, tables)
            self.log("attention ...")
            self._measure_attention(runner.backend, kv_caches[0], layer_sliding_windows(self.cfg)[0], tables,
                                    model, kv_caches)
            self.log("lm head ...")
            self._measure_lm_head(model, tables)
            self.log("copy bandwidth ...")
            copy_bw = self.measure_copy_bytes_per_s()
        profile = self._assemble(tables, device_name, model_name, emulation, copy_bw, 0.0, {})
        self.log("host costs (engine around the runner) ...")
        host = self._host_costs(runner, profile)
        del runner, model, kv_caches
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        m = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "measured_layers": self.num_layers,
            "attention_backend": backend_name,
            "block_size": self.options.block_size,
            "timing": dict(self.timing),
            "graph_capture_errors": dict(self.timer.capture_errors),
            "truncated": dict(self.truncated),
            "warmup": self.options.warmup,
            "repeat": self.options.repeat,
            "statistic": self.timer.statistic,
            "validation": self.validation,
            "torch": torch.__version__,
            "profile_wall_s": round(time.perf_counter() - t_start, 2),
            "notes": (
                "dense = forward with a no-op attention backend / layers (embedding and final norm included); "
                "attention = the engine backend on random KV; lm_head = norm + logits + argmax; "
                "step overheads, new-request overheads and idle wake-up = engine steps around the runner "
                "minus their table parts (hetserve/profiling/host.py)"
            ),
            "load_average": {"start": load_start, "end": _load_average()},
        }
        m.update(meta or {})
        return dataclasses.replace(
            profile, step_overhead_s=host.step_overhead_s, step_overhead_per_seq_s=host.step_overhead_per_seq_s,
            new_seq_overhead_s=host.new_seq_overhead_s, new_seq_overhead_per_token_s=host.new_seq_overhead_per_token_s,
            idle_wake=host.idle_wake, meta=m,
        )

    def _assemble(self, t: _Tables, device_name: str, model_name: str, emulation: str | None, copy_bw: float,
                  overhead: float, meta: dict[str, Any]) -> DeviceProfile:
        if not t.dense:
            raise ValidationError("profile", "no dense point was measured")
        dn = sorted(t.dense)
        dense = Table1D(tuple(float(x) for x in dn), tuple(t.dense[x] for x in dn))
        decode = prefill = lm = None
        if t.decode:
            ks = sorted(t.decode)
            decode = Table2D(tuple(float(k) for k in ks), tuple(float(c) for c in self.grid.decode_context_lens),
                             tuple(tuple(t.decode[k]) for k in ks))
        if t.prefill:
            ks = sorted(t.prefill)
            prefill = Table2D(tuple(float(k) for k in ks), tuple(float(c) for c in self.grid.prefill_context_lens),
                              tuple(tuple(t.prefill[k]) for k in ks))
        skew = None
        if t.skew:
            ks = sorted(t.skew)
            skew = SkewTable(tuple(float(k) for k in ks), tuple(t.skew[k][0] for k in ks), float(t.skew_context),
                             tuple(t.skew[k][1] for k in ks))
        if t.lm_head:
            ks = sorted(t.lm_head)
            lm = Table1D(tuple(float(k) for k in ks), tuple(t.lm_head[k] for k in ks))
        full = self.full_config
        kv_per_token = 2 * full.num_hidden_layers * full.num_key_value_heads * full.head_dim * self.dtype.itemsize
        return DeviceProfile(
            device_name=device_name,
            emulation=emulation,
            model_name=model_name,
            shape_hash=model_shape_hash(full),
            dtype=self.dtype_name,
            kv_cache_dtype=self.dtype_name,
            tp=1,
            dense=dense,
            decode_attn=decode,
            decode_attn_skew=skew,
            prefill_attn=prefill,
            lm_head=lm,
            copy_bytes_per_s=copy_bw,
            kv_bytes_per_token=kv_per_token,
            step_overhead_s=overhead,
            num_hidden_layers=full.num_hidden_layers,
            meta=meta,
        )

    def _host_costs(self, runner: Any, profile: DeviceProfile) -> HostCosts:
        """The engine's host terms around ``runner`` (on the profiler's stream); zeros if the engine cannot run."""
        g = self.grid
        ctx = g.decode_context_lens[min(1, len(g.decode_context_lens) - 1)]
        # prompts from the grid's shortest to ~1024 tokens: the per-token slope is read off this range and a
        # server applies it to prompts of thousands. Fitted over 16-128 tokens alone (0.1 ms of residual spread
        # over 112 tokens), it came out anywhere from 0 to 1.8 us a token on one H100 (session 7), i.e. +-2 ms
        # on a 2048-token prompt. Past ~1024 the prefill tables' own error would pass for a host cost.
        upto = [n for n in g.prefill_num_tokens if n <= 1024] or [g.prefill_num_tokens[0]]

        def near(x: float) -> int:
            return min(upto, key=lambda n: abs(math.log(n / x)))

        lengths = sorted({upto[0], near(256), near(1024)})
        ctx_mgr = torch.cuda.stream(self.stream) if self.device.type == "cuda" else nullcontext_()
        try:
            with ctx_mgr:
                host = measure_host_costs(
                    runner, profile, self.num_layers, decode_num_seqs=g.decode_num_seqs, decode_ctx=ctx,
                    prompt_lengths=lengths, idle_s=g.idle_s, warmup=self.options.warmup,
                    repeat=self.options.repeat, reduce=self.timer.reduce, seed=self.options.seed, log=self.log,
                )
        except Exception as e:  # noqa: BLE001 - the tables stand without it; say why the terms are 0
            self.validation.append({"error": f"engine steps failed: {type(e).__name__}: {e}"})
            self.log(f"  engine steps failed ({e}); host terms = 0")
            return HostCosts(0.0, 0.0, 0.0, 0.0, None)
        self.validation.extend(host.validation)
        return host


def _private_gen(device: torch.device) -> torch.Generator:
    """A generator of our own: after a CUDA graph capture torch's global CUDA generator can refuse eager draws
    ("Offset increment outside graph capture"), seen on torch 2.11 / H100."""
    g = torch.Generator(device=device)
    g.manual_seed(0)
    return g


def _load_average() -> list[float] | None:
    """1/5/15-minute load averages where the OS has them: a CPU profile taken on a busy machine says so."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
