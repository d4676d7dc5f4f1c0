"""What the GPU runtime's host adds to a step beyond the device tables, as measured on an H100 (torch 2.11,
Triton 3.6); ``CostModel`` reads them, a profile's ``meta`` may override the floors and the admission term."""

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
