"""One request's measured timeline: the common record of the benchmark client and the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """What one request did. Times in seconds; ``start_s``/``end_s``/``scheduled_s`` are relative to the
    benchmark start. ``e2el_s`` is start to last token (0 when the request failed)."""

    index: int
    prompt_len: int
    expected_output_len: int
    scheduled_s: float = 0.0
    success: bool = False
    error: str = ""
    status_code: int | None = None
    output_len: int = 0
    server_prompt_len: int | None = None
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    e2el_s: float = 0.0
    start_s: float = 0.0
    end_s: float = 0.0
    generated_text: str = ""
