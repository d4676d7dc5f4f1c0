"""A shadow executor for scheduler tests: it tracks which token sits in every KV slot and checks, before
each step, that every context position a request attends to holds exactly that request's token. The next
token is a fixed function of the whole sequence, so a correct engine reproduces a brute-force generation."""

from __future__ import annotations

from hetserve.core.interfaces import Executor
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput

VOCAB = 97


def next_token(seq: list[int]) -> int:
    h = 0
    for t in seq[-5:]:
        h = (h * 31 + t + 7) % 1_000_003
    return (h + len(seq)) % VOCAB


def brute_force(prompt: list[int], max_tokens: int, eos: int | None = None) -> list[int]:
    seq = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        t = next_token(seq)
        seq.append(t)
        out.append(t)
        if eos is not None and t == eos:
            break
    return out


class ShadowExecutor(Executor):
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self._num_blocks = num_blocks
        self.block_size = block_size
        self.slots: dict[int, tuple[str, int, int]] = {}  # slot -> (writer req, position, token)
        self.tables: dict[str, list[int]] = {}
        self.seqs: dict[str, list[int]] = {}
        self.steps: list[SchedulerOutput] = []

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    def _tokens(self, s) -> list[int]:
        """The step's tokens for one request; a placeholder is the token this executor sampled for it last
        (kept here as a GPU runner keeps it on the device)."""
        if not s.placeholder:
            return s.token_ids
        assert len(s.token_ids) == s.num_tokens - 1, "a placeholder is only ever the step's last token"
        seq = self.seqs[s.req_id]
        assert s.num_computed_tokens + s.num_tokens == len(seq), "the placeholder is not the last sampled token"
        return [*s.token_ids, seq[-1]]

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self.steps.append(so)
        for rid in so.finished_req_ids | so.preempted_req_ids:
            self.tables.pop(rid, None)
            self.seqs.pop(rid, None)
        bs = self.block_size
        # first read every context (as attention would), then write; a step's own tokens are visible to itself
        for s in so.scheduled:
            if s.new is not None:
                assert s.req_id not in self.tables, "new request the executor already knows"
                self.tables[s.req_id] = list(s.new_block_ids)
                self.seqs[s.req_id] = list(s.new.prompt_token_ids) + list(s.new.output_token_ids)
            else:
                self.tables[s.req_id].extend(s.new_block_ids)
            table, seq = self.tables[s.req_id], self.seqs[s.req_id]
            assert 0 not in table, "the null block was handed out"
            assert self._tokens(s) == seq[s.num_computed_tokens : s.num_computed_tokens + s.num_tokens]
            for p in range(s.num_computed_tokens):
                slot = table[p // bs] * bs + p % bs
                got = self.slots.get(slot)
                assert got is not None and got[1] == p and got[2] == seq[p], (
                    f"{s.req_id} pos {p}: slot {slot} holds {got}, expected token {seq[p]}"
                )
        written: set[int] = set()
        for s in so.scheduled:
            table = self.tables[s.req_id]
            for k, tok in enumerate(self._tokens(s)):
                p = s.num_computed_tokens + k
                slot = table[p // bs] * bs + p % bs
                assert slot not in written, f"two requests write slot {slot} in one step"
                written.add(slot)
                self.slots[slot] = (s.req_id, p, tok)
        sampled = []
        for s in so.scheduled:
            seq = self.seqs[s.req_id]
            if s.sample:
                assert s.num_computed_tokens + s.num_tokens == len(seq)
                t = next_token(seq)
                seq.append(t)
                sampled.append([t])
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids=[s.req_id for s in so.scheduled], sampled_token_ids=sampled)


class _Done:
    def __init__(self, out: ModelRunnerOutput) -> None:
        self.out = out
        self.resolved = False

    def result(self) -> ModelRunnerOutput:
        self.resolved = True
        return self.out


class AsyncShadowExecutor(ShadowExecutor):
    """The shadow executor as an async one (``execute_async``): the engine loop then keeps a step in flight and
    may schedule decodes on placeholders. Checks that steps are resolved in order, one in flight at most."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        super().__init__(num_blocks, block_size)
        self.pending: list[_Done] = []
        self.num_placeholders = 0

    def execute_async(self, so: SchedulerOutput) -> _Done:
        self.pending = [p for p in self.pending if not p.resolved]
        assert len(self.pending) <= 1, "more than one step left unresolved"
        self.num_placeholders += sum(s.placeholder for s in so.scheduled)
        done = _Done(self.execute(so))
        self.pending.append(done)
        return done
