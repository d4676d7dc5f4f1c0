"""What the GPU runtime's host adds to a step beyond the device tables, as measured on an H100 (torch 2.11,
Triton 3.6); ``CostModel`` reads them, a profile's ``meta`` may override the floors and the admission term."""

from hetserve.core.errors import ValidationError

# the host's cost of launching one decoder layer's kernels eagerly (see CostModel.__init__; a batch-4 decode,
# results/engine-s7/gpu-launch-floor-eager-decode.json), and the largest decode batch the runtime captures in a
# CUDA graph (EngineConfig.device.cuda_graph_max_batch's default)
EAGER_FLOOR_S_PER_LAYER = 0.35e-3
GRAPH_MAX_BATCH = 512

# a step of up to PIECEWISE_MAX_TOKENS tokens that is not a graphed decode replays piecewise graphs around eager
# attention (EngineConfig.device.piecewise_graph_max_tokens); its host launch per layer (results/engine-s6/
# gpu-launch-floor*.json: a mixed step of 8 decodes and a 24-token chunk launches in 3.8-4.1 ms for 32 layers with
# the step's attention bound once (PagedAttentionPlan), 7.6 ms before, 25.4 eager; ~0.12 ms a layer with the
# step's input preparation. Its device time, 8.7-9.0 ms, is the tables' business)
PIECEWISE_MAX_TOKENS = 1024
PIECEWISE_FLOOR_S_PER_LAYER = 0.12e-3

# an async engine hides its host work behind the step before, except some per new prompt token, which its device
# waits for. Session 7 (14 online runs, both Azure traces, 5 machines, each on its own profile): steps that admit
# a prompt took 3.4-4.3% longer on the device than the tables on three machines (1.0 us a token fit them within
# 0.6%), and matched them with nothing added on a fourth (clocks under sustained load differ between machines).
# 0.7 us lies between; it put 98 of 120 (run, metric) cells within issue 6's goals, 87 with none
# (results/engine-s7/fidelity-summary*.json). A runner without async scheduling pays all its host work.
ADMIT_SERIAL_S_PER_TOKEN = 0.7e-6

# A profile times 2 layers in short bursts. Machines of one SKU run sustained work at different speeds (clocks
# under load: session 7 saw big mixed steps 4% slower than the tables on three H100s and 4% faster on a fourth),
# which a burst does not see. ``profiling/sustained.py`` (``hetserve profile --sustained``) runs the whole model on
# its own request stream (uniform lengths, not the trace under test) and writes the ratio of the device spans to the
# model's time, by step kind, into the profile's meta; the cost model multiplies the device time by it. 1.0: none.
MIXED_DEVICE_SCALE = 1.0
DECODE_DEVICE_SCALE = 1.0


class HostTerms:
    """The terms above for one profile: a profile timed through CUDA graphs (``meta.timing.dense_s_per_layer ==
    "graph"``) gets the runtime's floors and admission term, its meta overriding any of them; others get none.
    The sustained-speed scales apply to any profile that has them."""

    def __init__(self, profile: object | None) -> None:
        meta = dict(getattr(profile, "meta", None) or {})
        self.graphed = profile is not None and (meta.get("timing") or {}).get("dense_s_per_layer") == "graph"
        g = self.graphed

        def term(key: str, default: float) -> float:
            return float(meta.get(key, default)) if g else 0.0

        self.eager_floor_s_per_layer = term("eager_floor_s_per_layer", EAGER_FLOOR_S_PER_LAYER)
        self.piecewise_floor_s_per_layer = term("piecewise_floor_s_per_layer", PIECEWISE_FLOOR_S_PER_LAYER)
        self.admit_serial_s_per_token = term("admit_serial_s_per_token", ADMIT_SERIAL_S_PER_TOKEN)
        self.mixed_device_scale = float(meta.get("mixed_device_scale", MIXED_DEVICE_SCALE))
        self.decode_device_scale = float(meta.get("decode_device_scale", DECODE_DEVICE_SCALE))
        for key in ("mixed_device_scale", "decode_device_scale"):
            v = getattr(self, key)
            if not 0.5 <= v <= 2.0:
                raise ValidationError(f"profile.meta.{key}", f"a sustained-speed scale must lie in [0.5, 2], got {v}")
