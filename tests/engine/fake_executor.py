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
            assert s.token_ids == seq[s.num_computed_tokens : s.num_computed_tokens + s.num_tokens]
            for p in range(s.num_computed_tokens):
                slot = table[p // bs] * bs + p % bs
                got = self.slots.get(slot)
                assert got is not None and got[1] == p and got[2] == seq[p], (
                    f"{s.req_id} pos {p}: slot {slot} holds {got}, expected token {seq[p]}"
                )
        written: set[int] = set()
        for s in so.scheduled:
            table = self.tables[s.req_id]
            for k, tok in enumerate(s.token_ids):
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
