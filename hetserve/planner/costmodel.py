"""Step time, KV transfer time and memory footprint of a model on a device: roofline by default, profile if given.

Roofline, per layer and per device (shapes divided by ``tp``), with ``T`` tokens in the step::

    dense GEMMs    max(2 T P / (peak * e_c(T)),  (P w + T a (4h + 2q + 2kv + 3i)) / (hbm * e_m))
    elementwise    T a (8h + 2(q + kv) + 3i) / (hbm * e_m)            norms+residual, rotary, SiLU-and-mul
    prefill attn   max(4 Hd d sum(pairs) / (peak * e_a(Tp)),  (2 kvd d b sum(c + n) + Tp a (2q + 2kv)) / (hbm * e_m))
    decode attn    max(4 Hd d (C + n) / (peak * e_a),          (2 kvd d b (C + n) + n a (2q + 2kv)) / (hbm * e_m))
    TP allreduce   2 x ring(T h a) over the TP link,  ring(x) = 2 (tp-1)/tp x / bw + 2 (tp-1) latency

summed over the stage's layers, plus the LM head ``max(2 S h V / (peak e_c(S)), (V h w + 3 S V 4) / (hbm e_m))``
(logits in fp32, read twice more by sampling), the embedding gather and the host overhead ``o + o_seq R + N (o_new
+ o_tok Tn)`` (``R`` requests, ``N`` of them new to the executor with ``Tn`` tokens between them; only ``o`` without
a profile, the rest is measured). Here ``P`` =
linear parameters of one layer, ``w``/``a``/``b`` = bytes per weight / activation / KV element, ``pairs`` = query-
key pairs of a causal chunk of ``n`` new tokens after ``c`` cached ones = ``n c + n (n + 1) / 2``, ``C`` = sum of
decode contexts, ``S`` = rows sampled. Efficiency: ``e_m = device.hbm_efficiency``; ``e_c(T) = gemm_efficiency
* T / (T + gemm_half_tokens)`` (small GEMMs leave SMs idle; half of the large-GEMM efficiency at
``gemm_half_tokens``); attention runs at ``attn_relative_efficiency`` of that.

With a :class:`DeviceProfile` the measured tables replace the dense+elementwise, attention and LM-head terms
(the profile wins); allreduce, embedding, KV conversion and any table the profile lacks stay roofline, with the
profile's measured ``copy_bytes_per_s`` as the memory bandwidth when it has one. A profile taken at another TP
degree is scaled by ``profile.tp / tp`` (an approximation).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hetserve.core.devices import DeviceSpec, LinkSpec, canonical_dtype, get_link
from hetserve.core.errors import ValidationError
from hetserve.core.graph_sizes import graph_batch_sizes, padded, piecewise_token_sizes
from hetserve.core.model_config import ModelConfig, dtype_num_bytes
from hetserve.planner.batch_shape import BatchShape
from hetserve.planner.profile import DeviceProfile, model_shape_hash
from hetserve.planner.runtime_terms import GRAPH_MAX_BATCH, PIECEWISE_MAX_TOKENS, HostTerms

if TYPE_CHECKING:
    from hetserve.core.outputs import SchedulerOutput

_LOGIT_BYTES = 4  # logits are fp32

__all__ = ["BatchShape", "CostModel"]  # BatchShape lives in batch_shape.py; importers keep this path


class CostModel:
    """Times and memory of ``model`` (or the stage ``layers`` of it) on ``device`` with ``tp``-way tensor parallelism.

    Build one per (model, device, dtype, tp, stage) and reuse it: construction computes every per-shape constant,
    so ``step_time_s`` is a few microseconds.
    """

    def __init__(
        self,
        model: ModelConfig,
        device: DeviceSpec,
        dtype: str = "bfloat16",
        profile: DeviceProfile | None = None,
        tp: int = 1,
        tp_link: LinkSpec | None = None,
        *,
        kv_cache_dtype: str | None = None,
        layers: tuple[int, int] | None = None,
        include_embedding: bool | None = None,
        include_lm_head: bool | None = None,
        step_overhead_s: float | None = None,
        gemm_half_tokens: float = 64.0,
        attn_relative_efficiency: float = 0.6,
        memory_utilization: float = 0.9,
        memory_bytes: int | None = None,
    ) -> None:
        self.model = model
        self.device = device
        self.dtype = canonical_dtype(dtype)
        self.kv_cache_dtype = canonical_dtype(dtype if kv_cache_dtype in (None, "auto") else kv_cache_dtype)
        self.profile = profile
        self.tp = tp
        self.tp_link = tp_link or get_link(device.host_link)
        self.gemm_half_tokens = gemm_half_tokens
        self.memory_utilization = memory_utilization
        self.memory_bytes = device.memory_bytes if memory_bytes is None else memory_bytes
        num_layers_total = model.num_hidden_layers
        start, end = layers if layers is not None else (0, num_layers_total)
        if not 0 <= start < end <= num_layers_total:
            raise ValidationError("layers", f"must satisfy 0 <= start < end <= {num_layers_total}, got {layers}")
        self.layers = (start, end)
        self.num_layers = end - start
        self.include_embedding = start == 0 if include_embedding is None else include_embedding
        self.include_lm_head = end == num_layers_total if include_lm_head is None else include_lm_head
        if not isinstance(tp, int) or tp < 1:
            raise ValidationError("tp", f"must be a positive integer, got {tp!r}")
        H, KVH = model.num_attention_heads, model.num_key_value_heads
        if H % tp or model.intermediate_size % tp:
            raise ValidationError("tp", f"{tp} must divide num_attention_heads {H} and intermediate_size")
        if KVH % tp and tp % KVH:
            raise ValidationError("tp", f"{tp} and num_key_value_heads {KVH} must divide one another")
        if not 0.0 < memory_utilization <= 1.0:
            raise ValidationError("memory_utilization", f"must be in (0, 1], got {memory_utilization}")

        self.peak_flops = device.flops(self.dtype)
        self.w_bytes = dtype_num_bytes(self.dtype)
        self.a_bytes = 2 if self.dtype == "fp8" else self.w_bytes  # fp8 weights keep 16-bit activations
        self.kv_elem_bytes = dtype_num_bytes(self.kv_cache_dtype)
        d, h = model.head_dim, model.hidden_size
        self.heads_dev = H // tp
        self.kv_heads_dev = max(1, KVH // tp)  # replicated when tp > num_key_value_heads
        q, kv, i = self.heads_dev * d, self.kv_heads_dev * d, model.intermediate_size // tp
        self.vocab_dev = -(-model.vocab_size // tp)
        linear = h * q + 2 * h * kv + q * h + 3 * h * i
        biases = (
            (q + 2 * kv if model.qkv_bias else 0) + (h if model.o_bias else 0) + (2 * i + h if model.mlp_bias else 0)
        )
        norms = 2 * h + (2 * d if model.qk_norm else 0)
        self.layer_params_dev = linear + biases + norms
        self.layer_linear_params_dev = linear

        eff_m = device.hbm_bytes_per_s * device.hbm_efficiency
        self._inv_mem_bw = 1.0 / eff_m
        self._gemm_peak = self.peak_flops * device.gemm_efficiency
        self._attn_peak = self._gemm_peak * attn_relative_efficiency
        a, b = self.a_bytes, self.kv_elem_bytes
        # per layer, per device
        self._dense_flops_per_token = 2.0 * linear
        self._dense_weight_bytes = self.layer_params_dev * self.w_bytes
        self._dense_act_bytes_per_token = a * (4 * h + 2 * q + 2 * kv + 3 * i)
        self._elem_bytes_per_token = a * (8 * h + 2 * (q + kv) + 3 * i)
        self._attn_flops_per_pair_head = 4.0 * d  # QK^T and PV, 2 FLOP a multiply-add each
        self._kv_bytes_per_key_head = 2 * d * b
        self._attn_io_bytes_per_token = a * (2 * q + 2 * kv)
        self._allreduce_bytes_per_token = h * a
        self._lm_flops_per_row = 2.0 * h * self.vocab_dev
        self._lm_weight_bytes = self.vocab_dev * h * self.w_bytes
        self._lm_bytes_per_row = 3 * self.vocab_dev * _LOGIT_BYTES
        self._embed_bytes_per_token = 2 * h * a
        self._dense_cache: dict[int, float] = {}

        if profile is not None:
            self._check_profile(profile)
            if profile.copy_bytes_per_s:
                self._inv_mem_bw = 1.0 / profile.copy_bytes_per_s  # measured beats datasheet x efficiency
        if step_overhead_s is not None:
            self.step_overhead_s = step_overhead_s
        elif profile is not None:
            self.step_overhead_s = profile.step_overhead_s
        else:
            self.step_overhead_s = device.step_overhead_s
        # host time each request adds to a step (scheduler, input preparation, outputs), and a request's first
        # step on top (admission, runner state, first output); measured only
        self.step_overhead_per_seq_s = profile.step_overhead_per_seq_s if profile is not None else 0.0
        self.new_seq_overhead_s = profile.new_seq_overhead_s if profile is not None else 0.0
        self.new_seq_overhead_per_token_s = profile.new_seq_overhead_per_token_s if profile is not None else 0.0
        self._profile_scale = (profile.tp / tp) if profile is not None else 1.0
        # A profile timed through CUDA graphs describes the runtime's graph steps only: decode-only batches of up
        # to ``graph_max_batch`` sequences on a runner that holds the whole model (no PP stage, no TP rank, no
        # Hetis main). Every other step runs eagerly, where launching each layer's kernels from Python takes
        # ``eager_floor_s_per_layer`` however little the GPU has to do (runtime_terms.py). Plans set
        # ``graph_max_batch`` to 0 where the runtime never captures graphs.
        terms = HostTerms(profile)
        # a runtime that replays graphs runs a graph step's dense layers at the captured size the step pads to
        # (decode batches, piecewise token counts: core/graph_sizes.py), not at its own token count
        self.graphed = terms.graphed
        self._pad_sizes: dict[tuple[str, int], list[int]] = {}
        self.eager_floor_s_per_layer = terms.eager_floor_s_per_layer
        whole = self.num_layers == num_layers_total and tp == 1
        self.graph_max_batch = GRAPH_MAX_BATCH if whole else 0
        # async scheduling (an LLMEngine around one runner; cluster workers run steps in series): the host's work
        # for the next step (the overhead terms, the launches) overlaps this step's device time, so a step takes
        # the longer of the two instead of their sum
        self.async_scheduling = False
        # the runtime schedules one step ahead (an instance of one worker: no PP, no TP, not a Hetis main): a step
        # is scheduled when the one before it starts, so an arrival joins the step after next (the simulator's
        # look-ahead); with ``async_scheduling`` the host's work also overlaps the device's
        self.schedules_ahead = tp == 1 and self.num_layers == num_layers_total
        # piecewise graphs: whole models and pipeline stages without TP (a Hetis main sets 0: never graphed)
        self.piecewise_max_tokens = PIECEWISE_MAX_TOKENS if tp == 1 else 0
        self.piecewise_floor_s_per_layer = terms.piecewise_floor_s_per_layer
        self.admit_serial_s_per_token = terms.admit_serial_s_per_token
        # this machine's sustained speed against its profile's bursts, by step kind (runtime_terms.py)
        self.mixed_device_scale, self.decode_device_scale = terms.mixed_device_scale, terms.decode_device_scale

    def _check_profile(self, p: DeviceProfile) -> None:
        if not p.matches(self.model):
            raise ValidationError(
                "profile",
                f"measured for model shape {p.shape_hash} ({p.model_name}); this model's is "
                f"{model_shape_hash(self.model)}",
            )
        if canonical_dtype(p.dtype) != self.dtype:
            raise ValidationError("profile", f"measured in {p.dtype}; the cost model runs {self.dtype}")
        if p.device_name != self.device.name:
            raise ValidationError(
                "profile", f"measured on {p.device_name}; the cost model's device is {self.device.name}"
            )

    # ------------------------------------------------------------------ step time

    def e_compute(self, num_tokens: float) -> float:
        """GEMM efficiency at ``num_tokens`` rows: ``gemm_efficiency * T / (T + gemm_half_tokens)``."""
        return self.device.gemm_efficiency * num_tokens / (num_tokens + self.gemm_half_tokens)

    def _dense_layer_s(self, T: int) -> float:
        t = self._dense_cache.get(T)
        if t is None:
            if self.profile is not None:
                t = self.profile.dense(T) * self._profile_scale
            else:
                sat = T / (T + self.gemm_half_tokens)
                compute = self._dense_flops_per_token * T / (self._gemm_peak * sat)
                memory = (self._dense_weight_bytes + self._dense_act_bytes_per_token * T) * self._inv_mem_bw
                t = (compute if compute > memory else memory) + self._elem_bytes_per_token * T * self._inv_mem_bw
            self._dense_cache[T] = t
        return t

    def _attn_layer_s(self, batch: BatchShape, num_kv_heads: int | None) -> float:
        kvh = self.kv_heads_dev if num_kv_heads is None else num_kv_heads
        if kvh == 0:
            return 0.0
        frac = kvh / self.kv_heads_dev
        total = 0.0
        p = self.profile
        n = batch.num_decode_seqs
        if n:
            if p is not None and p.decode_attn is not None:
                mean = batch.decode_context_tokens / n
                t = p.decode_attn(n, mean) * frac * self._profile_scale
                cmax = batch.decode_max_context
                if p.decode_attn_skew is not None and cmax > mean > 0:
                    # uneven contexts: the long sequences finish last (profile.SkewTable); never more than if
                    # every sequence had the longest context
                    scaled = t * (1.0 + max(0.0, p.decode_attn_skew(n)) * (cmax / mean - 1.0))
                    t = min(scaled, max(t, p.decode_attn(n, cmax) * frac * self._profile_scale))
                total += t
            else:
                keys = batch.decode_context_tokens + n
                compute = self._attn_flops_per_pair_head * self.heads_dev * frac * keys / self._attn_peak
                memory = self._kv_bytes_per_key_head * kvh * keys + self._attn_io_bytes_per_token * frac * n
                memory *= self._inv_mem_bw
                total += compute if compute > memory else memory
        if batch.prefill_chunks:
            if p is not None and p.prefill_attn is not None:
                table = p.prefill_attn
                total += sum(table(c_n, c_ctx) for c_n, c_ctx in batch.prefill_chunks) * frac * self._profile_scale
            else:
                pairs = 0.0
                keys = 0
                tokens = 0
                for c_n, c_ctx in batch.prefill_chunks:
                    pairs += c_n * c_ctx + c_n * (c_n + 1) / 2
                    keys += c_ctx + c_n
                    tokens += c_n
                sat = tokens / (tokens + self.gemm_half_tokens)
                compute = self._attn_flops_per_pair_head * self.heads_dev * frac * pairs / (self._attn_peak * sat)
                memory = self._kv_bytes_per_key_head * kvh * keys + self._attn_io_bytes_per_token * frac * tokens
                memory *= self._inv_mem_bw
                total += compute if compute > memory else memory
        return total

    def _lm_head_s(self, rows: int) -> float:
        if rows <= 0:
            return 0.0
        p = self.profile
        if p is not None and p.lm_head is not None:
            t = p.lm_head(rows) * self._profile_scale
        else:
            compute = self._lm_flops_per_row * rows / (self._gemm_peak * rows / (rows + self.gemm_half_tokens))
            memory = (self._lm_weight_bytes + self._lm_bytes_per_row * rows) * self._inv_mem_bw
            t = compute if compute > memory else memory
        if self.tp > 1:
            t += self.ring_time_s(rows * self.vocab_dev * self.tp * _LOGIT_BYTES, allgather=True)
        return t

    def ring_time_s(self, num_bytes: float, allgather: bool = False) -> float:
        """A ring all-reduce (or all-gather) of ``num_bytes`` over ``tp`` devices on ``tp_link``."""
        if self.tp == 1:
            return 0.0
        steps = (self.tp - 1) * (1 if allgather else 2)
        return steps / self.tp * num_bytes / self.tp_link.bandwidth_bytes_per_s + steps * self.tp_link.latency_s

    def breakdown(self, batch: BatchShape, num_kv_heads: int | None = None) -> dict[str, float]:
        """Seconds per component for the whole stage: dense, attention, allreduce, lm_head, embedding, overhead."""
        T = batch.num_tokens
        if T == 0:
            return {"dense": 0.0, "attention": 0.0, "allreduce": 0.0, "eager_launch": 0.0, "lm_head": 0.0,
                    "embedding": 0.0, "overhead": 0.0, "sustained_speed": 0.0}
        L = self.num_layers
        rows = batch.num_reqs if batch.num_sampled is None else batch.num_sampled
        out = {
            "dense": L * self._dense_layer_s(self._dense_tokens(batch)),
            "attention": L * self._attn_layer_s(batch, num_kv_heads),
            "allreduce": L * 2 * self.ring_time_s(T * self._allreduce_bytes_per_token),
        }
        layers = out["dense"] + out["attention"] + out["allreduce"]
        out["eager_launch"] = self._eager_layers_s(batch, layers) - layers
        out["lm_head"] = self._lm_head_s(rows) if self.include_lm_head else 0.0
        out["embedding"] = T * self._embed_bytes_per_token * self._inv_mem_bw if self.include_embedding else 0.0
        out["overhead"] = self._overhead_s(batch)
        # this machine's sustained speed against the profile (0 without a scale; runtime_terms.py)
        out["sustained_speed"] = self.step_time_s(batch, num_kv_heads, serial=True) - sum(out.values())
        # async scheduling: what the overlap of host and device saves (<= 0; 0 without it)
        out["async_overlap"] = self.step_time_s(batch, num_kv_heads) - sum(out.values())
        return out

    def _eager_layers_s(self, batch: BatchShape, layers_s: float) -> float:
        """The decoder layers' seconds as the runtime spends them: graphed, or floored by eager launches."""
        return max(layers_s, self._launch_floor_s(batch))

    def _dense_tokens(self, batch: BatchShape) -> int:
        """Rows the dense layers compute for ``batch``: its tokens, padded to the captured graph size where the
        runtime replays one (a graph-timed profile only: a runtime without graphs pads nothing)."""
        T = batch.num_tokens
        if not self.graphed:
            return T
        if not batch.prefill_chunks and batch.num_reqs <= self.graph_max_batch:
            kind, limit = "decode", self.graph_max_batch
        elif T <= self.piecewise_max_tokens:
            kind, limit = "piecewise", self.piecewise_max_tokens
        else:
            return T
        sizes = self._pad_sizes.get((kind, limit))
        if sizes is None:
            sizes = graph_batch_sizes(limit) if kind == "decode" else piecewise_token_sizes(limit)
            self._pad_sizes[(kind, limit)] = sizes
        return padded(sizes, T)

    def _launch_floor_s(self, batch: BatchShape) -> float:
        """Host seconds launching the step's layers when it is not one graph replay (0 for a graph step): the
        piecewise-graph floor up to ``piecewise_max_tokens`` tokens, the eager floor beyond."""
        graph_step = not batch.prefill_chunks and batch.num_reqs <= self.graph_max_batch
        if graph_step or not self.eager_floor_s_per_layer:
            return 0.0
        floor = self.eager_floor_s_per_layer
        if batch.num_tokens <= self.piecewise_max_tokens:
            floor = self.piecewise_floor_s_per_layer
        return self.num_layers * floor

    def _overhead_s(self, batch: BatchShape) -> float:
        return (
            self.step_overhead_s
            + batch.num_reqs * self.step_overhead_per_seq_s
            + batch.num_new_seqs * self.new_seq_overhead_s
            # at least what an async engine's device waits for (ADMIT_SERIAL_S_PER_TOKEN): never more async
            + batch.new_seq_tokens * max(self.new_seq_overhead_per_token_s, self.admit_serial_s_per_token)
        )

    def idle_wake_s(self, idle_s: float) -> float:
        """Extra seconds of a step that starts after the engine sat idle for ``idle_s`` (measured; 0 without
        a profile that has the table). The simulator adds it to the first step after a gap."""
        return self.profile.idle_wake_s(idle_s) if self.profile is not None else 0.0

    def step_time_s(self, batch: BatchShape, num_kv_heads: int | None = None, serial: bool = False) -> float:
        """Seconds for one step of ``batch``; an empty batch costs 0.

        ``num_kv_heads``: KV heads (per device) whose attention runs here; the others are offloaded (Hetis).
        ``serial``: host and device in series even with async scheduling (a step that starts an idle engine has
        no step in flight to hide its host work behind).
        """
        T = batch.num_tokens
        if T == 0:
            return 0.0
        t = self._dense_layer_s(self._dense_tokens(batch)) + self._attn_layer_s(batch, num_kv_heads)
        if self.tp > 1:
            t += 2 * self.ring_time_s(T * self._allreduce_bytes_per_token)
        layers = t * self.num_layers
        launch = self._launch_floor_s(batch)
        device = layers
        if self.include_lm_head:
            device += self._lm_head_s(batch.num_reqs if batch.num_sampled is None else batch.num_sampled)
        if self.include_embedding:
            device += T * self._embed_bytes_per_token * self._inv_mem_bw
        scale = self.mixed_device_scale if batch.prefill_chunks else self.decode_device_scale
        if self.async_scheduling and not serial:
            # the launches and the overhead terms are host time, spent while the previous step runs; all but
            # ``admit_serial_s_per_token`` per new prompt token, which the device waits for (ADMIT_SERIAL_...)
            busy = (device + batch.new_seq_tokens * self.admit_serial_s_per_token) * scale
            return max(busy, launch + self._overhead_s(batch))
        return device * scale + max(0.0, launch - layers * scale) + self._overhead_s(batch)

    def step_time_from_scheduler_output(self, out: SchedulerOutput) -> float:
        return self.step_time_s(BatchShape.from_scheduler_output(out))

    def step_time_from_lists(self, num_scheduled_tokens: Sequence[int], num_computed_before: Sequence[int]) -> float:
        """Per request: new tokens this step, and tokens with KV before it (decode = 1 new token)."""
        return self.step_time_s(BatchShape.from_lists(num_scheduled_tokens, num_computed_before))

    def attention_time_s(self, batch: BatchShape, num_kv_heads: int | None = None) -> float:
        """Attention alone over the stage's layers for ``num_kv_heads`` KV heads (a Hetis attention worker)."""
        return self.num_layers * self._attn_layer_s(batch, num_kv_heads)

    def prefill_time_s(self, num_tokens: int, context: int = 0) -> float:
        """One request's prefill chunk of ``num_tokens`` after ``context`` cached tokens, alone in a step."""
        if num_tokens == 1:
            return self.step_time_s(BatchShape((), 1, context))
        return self.step_time_s(BatchShape(((num_tokens, context),)))

    def decode_time_s(self, batch: int, mean_context: float) -> float:
        """A decode-only step of ``batch`` sequences with ``mean_context`` cached tokens each."""
        return self.step_time_s(BatchShape((), batch, round(batch * mean_context)))

    # ------------------------------------------------------------------ KV and activations

    def kv_bytes_per_token(self, dtype: str | None = None, num_kv_heads: int | None = None) -> int:
        """KV bytes one token takes on this device for the stage's layers (all its KV heads, or ``num_kv_heads``)."""
        b = dtype_num_bytes(canonical_dtype(dtype)) if dtype else self.kv_elem_bytes
        kvh = self.kv_heads_dev if num_kv_heads is None else num_kv_heads
        return 2 * self.num_layers * kvh * self.model.head_dim * b

    def kv_bytes(self, num_tokens: int, dtype: str | None = None) -> int:
        """KV of ``num_tokens`` tokens for the stage's layers over all KV heads of the model (what a transfer moves)."""
        b = dtype_num_bytes(canonical_dtype(dtype)) if dtype else self.kv_elem_bytes
        return 2 * self.num_layers * self.model.num_key_value_heads * self.model.head_dim * b * num_tokens

    def kv_transfer_time_s(
        self,
        num_tokens: int,
        link: LinkSpec,
        src_dtype: str | None = None,
        dst_dtype: str | None = None,
        conversion: bool = True,
    ) -> float:
        """Moving the KV of ``num_tokens`` tokens over ``link``: latency + bytes / bandwidth + conversion.

        The wire carries the smaller of the two dtypes (the side that shrinks converts). With ``conversion``
        (layout, block size or dtype differ) one memory-bound pass reading the source and writing the
        destination bytes is charged at this device's bandwidth.
        """
        src = self.kv_bytes(num_tokens, src_dtype)
        dst = self.kv_bytes(num_tokens, dst_dtype or src_dtype)
        t = link.latency_s + min(src, dst) / link.bandwidth_bytes_per_s
        if conversion:
            t += (src + dst) * self._inv_mem_bw
        return t

    def activation_bytes(self, num_tokens: int) -> int:
        """Hidden states of ``num_tokens`` tokens: what a pipeline stage hands to the next."""
        return num_tokens * self.model.hidden_size * self.a_bytes

    # ------------------------------------------------------------------ memory

    def weight_bytes(self) -> int:
        """Weights one device holds for this stage (TP shards, replicated KV heads and norms included)."""
        m = self.model
        params = self.num_layers * self.layer_params_dev
        embed = self.vocab_dev * m.hidden_size
        if self.include_embedding:
            params += embed
        if self.include_lm_head:
            params += m.hidden_size  # final norm
            if not (m.tie_word_embeddings and self.include_embedding):
                params += embed
        return params * self.w_bytes

    def memory_footprint(
        self, max_num_seqs: int, max_num_batched_tokens: int, memory_bytes: int | None = None
    ) -> dict[str, int]:
        """Bytes on one device: weights, peak activations, reserved, and what is left for KV.

        ``memory_bytes`` defaults to the constructor's (the device's, or a cluster cap). The budget is
        ``memory_utilization * memory_bytes``; ``max_kv_tokens`` is rounded down to whole KV blocks.
        """
        m = self.model
        total = self.memory_bytes if memory_bytes is None else memory_bytes
        h, i = m.hidden_size, m.intermediate_size // self.tp
        q, kv = self.heads_dev * m.head_dim, self.kv_heads_dev * m.head_dim
        per_token = max(2 * h + 3 * i, 3 * h + 2 * q + 2 * kv)  # live tensors in the MLP / attention half
        activation = max_num_batched_tokens * per_token * self.a_bytes
        if self.include_lm_head:
            activation += min(max_num_seqs, max_num_batched_tokens) * self.vocab_dev * _LOGIT_BYTES * 2
        weights = self.weight_bytes()
        budget = int(total * self.memory_utilization)
        reserved = self.device.reserved_bytes
        kv_avail = max(0, budget - weights - activation - reserved)
        per_kv_token = self.kv_bytes_per_token()
        block = self.device.kv_block_size
        num_blocks = kv_avail // (per_kv_token * block)
        return {
            "memory_bytes": total,
            "budget_bytes": budget,
            "weights_bytes": weights,
            "activation_bytes": activation,
            "reserved_bytes": reserved,
            "kv_bytes_available": kv_avail,
            "kv_bytes_per_token": per_kv_token,
            "num_kv_blocks": num_blocks,
            "max_kv_tokens": num_blocks * block,
        }

    def fits(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        min_kv_tokens: int | None = None,
        memory_bytes: int | None = None,
    ) -> bool:
        """Whether weights and activations fit and KV room remains for ``min_kv_tokens`` (default: one full batch)."""
        fp = self.memory_footprint(max_num_seqs, max_num_batched_tokens, memory_bytes)
        need = max_num_batched_tokens if min_kv_tokens is None else min_kv_tokens
        return fp["kv_bytes_available"] > 0 and fp["max_kv_tokens"] >= need
