"""The rollout engine's static geometry (`EngineSpec`) and the page arithmetic of a request: what a
request holds in the paged KV pool, used by the fit check and by the scheduler alike."""
from __future__ import annotations

import dataclasses
import math

from jaxrl_entropy.models.paged_cache import pages_for


class RequestTooLarge(ValueError):
    """A single request (prompt + max_new_tokens) needs more pages than the whole pool holds."""


# ------------------------------------------------------------------------------ page arithmetic
# The one account of what a request holds, used by the fit check and by the scheduler alike. A
# prompt of n tokens prefills its first n − 1 into `shared_pages` full pages (read-only, shared by
# its samples) and, when n − 1 is not a whole number of pages, one partial page: the copy source
# of each sample's first private page, kept while any sample of the prompt runs. So the need is
# not monotone in n: with page 4 and 6 new tokens, 9 tokens need 4 pages but 8 tokens need 5.
def shared_pages(prompt_len: int, page_size: int) -> int:
    """Full prompt pages (of the n − 1 prefilled tokens) a prompt's samples share read-only."""
    return (prompt_len - 1) // page_size


def prompt_pages(prompt_len: int, page_size: int) -> int:
    """Pages a resident prompt holds: its full pages plus the partial last one, if any."""
    return pages_for(prompt_len - 1, page_size)


def private_pages(prompt_len: int, steps: int, page_size: int) -> int:
    """Private pages of a sample after `steps` ≥ 1 decode steps: those holding positions
    n − 1 .. n + steps − 2 (the copied partial page included) beyond the shared ones."""
    last = prompt_len - 1 + steps - 1
    return last // page_size + 1 - shared_pages(prompt_len, page_size)


def request_pages(prompt_len: int, max_new_tokens: int, page_size: int) -> int:
    """Pages one request holds at its longest, alone in the pool: its prompt's pages plus its
    private pages after `max_new_tokens` steps. A pool of fewer (null page excluded) can never
    finish it."""
    return prompt_pages(prompt_len, page_size) + private_pages(prompt_len, max_new_tokens, page_size)


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    """The engine's static geometry: one compiled prefill per bucket, one decode per setting.

    num_slots: decode rows run together. page_size: tokens per page. num_pages: pages per layer,
    the null page included. max_prompt_len: longest prompt (tokens) the buckets cover.
    decode_chunk: decode steps per program call (host scheduling in between). prefill_tokens:
    prompt tokens per prefill call (rows = prefill_tokens // bucket). prefill_multiple: bucket
    lengths are multiples of it (0 = page_size; TPU attention kernels want 128).
    attention_backend: shell of the paged decode attention (None: by platform). megacore_mode: TPU
    kernel option.
    """
    num_slots: int
    page_size: int
    num_pages: int
    max_prompt_len: int
    decode_chunk: int = 32
    prefill_tokens: int = 8192
    prefill_multiple: int = 0
    attention_backend: str | None = None
    megacore_mode: str | None = None

    def __post_init__(self):
        for name in ("num_slots", "page_size", "max_prompt_len", "decode_chunk", "prefill_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"EngineSpec.{name} must be positive, got {getattr(self, name)}")
        if self.num_pages < 2:
            raise ValueError(f"EngineSpec.num_pages={self.num_pages}: the pool needs the null page and at least one more")

    def buckets(self) -> tuple[int, ...]:
        """Prefill lengths (of the n − 1 prefilled tokens): whole pages (and multiples of
        `prefill_multiple`), doubling, up to the longest prompt."""
        unit = math.lcm(self.page_size, self.prefill_multiple or self.page_size)
        top = -(-max(self.max_prompt_len - 1, 1) // unit) * unit
        out, t = [], unit
        while t < top:
            out.append(t)
            t *= 2
        return tuple(out) + (top,)

    def bucket_for(self, n_tokens: int) -> int:
        for b in self.buckets():
            if n_tokens <= b:
                return b
        raise ValueError(f"a prompt of {n_tokens + 1} tokens is longer than the engine's max_prompt_len="
                         f"{self.max_prompt_len} (config data.max_prompt_len)")

    def prefill_rows(self, bucket: int, n_prompts: int | None = None) -> int:
        """Rows of a prefill call at `bucket`: at most `prefill_tokens // bucket`; for fewer
        prompts, the next power of two (a few compiled shapes, little padding)."""
        most = max(1, self.prefill_tokens // bucket)
        if n_prompts is None or n_prompts >= most:
            return most
        return min(most, 1 << max(0, n_prompts - 1).bit_length())

    def table_width(self, max_new_tokens: int) -> int:
        """Page-table entries per slot: every position a request can write."""
        return pages_for(self.max_prompt_len + max_new_tokens, self.page_size)
