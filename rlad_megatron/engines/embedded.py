"""The embedded engine: HF checkpoints served in-process by a small torch decoder with a KV cache.

Design (continuous batching, kept simple):
* A batch owns a static KV cache of `max_batch_size` rows, preallocated once. Active sequences
  always occupy rows [0, n); a decode step runs on those rows only (a view, no copy).
* When sequences finish, waiting requests are prefilled together (right-padded, one forward)
  into the freed rows; when nothing is waiting, the last active row is moved into the hole so the
  active rows stay contiguous.
* The decode step is vectorised: per-row temperature/top-p/top-k/seed tensors, stop tokens as a
  padded table, outputs written into preallocated [rows, max_new_tokens] tensors. Python only
  runs per finished sequence, never per sequence per step.
* `score` is a plain batched forward (no cache) with log-softmax at the aligned positions.

The same loop serves in-process `generate` (work from a list) and the HTTP server (work from a
queue, see server.py). Left out: prefix caching, chunked prefill, speculative decoding.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlad_megatron.engines import request_rules
from rlad_megatron.engines.base import (
    EngineError,
    GenerateOutput,
    OnSample,
    SamplingParams,
    ScoreOutput,
    check_prompts,
    sample_seed,
)
from rlad_megatron.engines.model import (
    DecoderModel,
    KVCache,
    Routes,
    compact_expert_ids,
    iter_safetensors,
    load_model,
    read_config,
)
from rlad_megatron.engines.sampling import sample_next


@dataclass
class Work:
    """One sequence to generate; `done` is called with its output (from the engine thread)."""

    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int
    done: Callable[[Work, GenerateOutput], None]
    stop_ids: tuple[int, ...] = ()
    tag: Any = None
    meta: dict = field(default_factory=dict)

    @property
    def max_len(self) -> int:
        return len(self.prompt_ids) + self.sampling.max_new_tokens


class _Rows:
    """Per-row state of a running batch (`cap` rows; rows [0, n) are active).

    Outputs live in step-major ring buffers out_tok / out_lp [width, cap]: at global step g every
    active row writes slot g % width of its own column (one slice copy per step, no scatter); a row
    admitted at step start_g[r] finds its k tokens at slots (start_g[r] + 0..k-1) % width.
    """

    def __init__(self, cap: int, width: int, max_stops: int):
        self.work: list[Work | None] = [None] * cap
        self.n, self.g, self.width = 0, 0, width
        self.start_g = [0] * cap
        self.end_g = [0] * cap  # global step at which the row reaches its token budget
        self.any_stops = False  # whether some active row has stop tokens (else only budgets end rows)
        self.next_tok = torch.zeros(cap, dtype=torch.int64)
        self.lens = torch.zeros(cap, dtype=torch.int64)
        self.ngen = torch.zeros(cap, dtype=torch.int64)
        self.max_new = torch.zeros(cap, dtype=torch.int64)
        self.temperature = torch.ones(cap)
        self.top_p = torch.ones(cap)
        self.top_k = torch.full((cap,), -1, dtype=torch.int64)
        self.seeds = torch.zeros(cap, dtype=torch.int64)
        self.stops = torch.full((cap, max_stops), -1, dtype=torch.int64)
        self.out_tok = torch.zeros(width, cap, dtype=torch.int64)
        self.out_lp = torch.zeros(width, cap)
        self.out_routes: torch.Tensor | None = None
        """[width, cap, layers, k] experts of each decode step's input token, once a row asks for them."""
        self._per_row = [
            self.next_tok,
            self.lens,
            self.ngen,
            self.max_new,
            self.temperature,
            self.top_p,
            self.top_k,
            self.seeds,
            self.stops,
        ]

    def admit(self, works: list[Work]) -> slice:
        """Append works as rows [n, n + m), vectorised; returns their slice."""
        sl = slice(self.n, self.n + len(works))
        sps = [w.sampling for w in works]
        self.lens[sl] = torch.tensor([len(w.prompt_ids) for w in works])
        self.ngen[sl] = 0
        self.max_new[sl] = torch.tensor([sp.max_new_tokens for sp in sps])
        self.temperature[sl] = torch.tensor([sp.temperature for sp in sps], dtype=self.temperature.dtype)
        self.top_p[sl] = torch.tensor([sp.top_p for sp in sps], dtype=self.top_p.dtype)
        self.top_k[sl] = torch.tensor([sp.top_k for sp in sps])
        self.seeds[sl] = torch.tensor([w.seed for w in works])
        width = self.stops.shape[1]
        self.stops[sl] = torch.tensor([list(w.stop_ids) + [-1] * (width - len(w.stop_ids)) for w in works])
        for j, w in enumerate(works):
            self.work[sl.start + j] = w
            self.start_g[sl.start + j] = self.g
            self.end_g[sl.start + j] = self.g + w.sampling.max_new_tokens - 1
        self.n += len(works)
        self.refresh_flags()
        return sl

    def refresh_flags(self) -> None:
        """Recompute the Python-side summaries of the active rows (after admitting or releasing)."""
        active = [self.row_work(r) for r in range(self.n)]
        self.any_stops = any(w.stop_ids for w in active)
        self.all_greedy = all(w.sampling.temperature <= 0 for w in active)
        self.min_end_g = min(self.end_g[: self.n], default=0)
        self.max_lens = int(self.lens[: self.n].max()) if self.n else 0  # kept in step by _decode_step

    def outputs(self, r: int) -> tuple[list[int], list[float]]:
        k = int(self.ngen[r])
        slots = (self.start_g[r] + torch.arange(k)) % self.width
        return self.out_tok[slots, r].tolist(), self.out_lp[slots, r].tolist()

    def routes(self, r: int) -> torch.Tensor:
        """Experts of the row's fed tokens: the prompt's (from its prefill), then every generated token but the
        last (the decode step after sampling token j feeds it and writes slot start_g + 1 + j)."""
        slots = (self.start_g[r] + 1 + torch.arange(int(self.ngen[r]) - 1)) % self.width
        decoded = self.out_routes[slots, r] if self.out_routes is not None else None
        prompt = self.row_work(r).meta["prompt_routes"]
        return prompt if decoded is None else torch.cat([prompt, decoded])

    def row_work(self, r: int) -> Work:
        work = self.work[r]
        if work is None:
            raise RuntimeError(f"batch row {r} is not active")
        return work

    def move(self, src: int, dst: int) -> None:
        for t in self._per_row:
            t[dst] = t[src]
        self.out_tok[:, dst] = self.out_tok[:, src]
        self.out_lp[:, dst] = self.out_lp[:, src]
        if self.out_routes is not None:
            self.out_routes[:, dst] = self.out_routes[:, src]
        self.start_g[dst], self.end_g[dst] = self.start_g[src], self.end_g[src]
        self.work[dst], self.work[src] = self.work[src], None


class EmbeddedEngine:
    """In-process engine over an HF folder. Thread-safe: one batch runs at a time (a lock)."""

    def __init__(
        self,
        model_dir: str | Path,
        max_batch_size: int = 64,
        dtype: torch.dtype = torch.float32,
        max_score_tokens: int = 16384,
        context_length: int | None = None,
    ):
        self.model_dir = str(model_dir)
        self.model: DecoderModel = load_model(model_dir, dtype=dtype)
        self.spec = self.model.spec
        self.context_length = int(context_length or self.spec.max_positions)
        """Longest prompt + response, SGLang's context_len (engines/request_rules.py applies it)."""
        self.max_batch_size = int(max_batch_size)
        self.max_score_tokens = int(max_score_tokens)
        self.version = 0
        self._lock = threading.RLock()
        self._closed = False

    # ------------------------------------------------------------------ generate
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, n: int = 1, on_sample: OnSample | None = None
    ) -> list[list[GenerateOutput]]:
        """n samples per prompt (continuous batching); `on_sample` fires as each sequence leaves the batch."""
        check_prompts(prompt_ids, self.spec.vocab_size)
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        budgets = [self.max_new_tokens_for(len(p), sampling.max_new_tokens) for p in prompt_ids]
        results: list[list[GenerateOutput | None]] = [[None] * n for _ in prompt_ids]

        def done(w: Work, out: GenerateOutput) -> None:
            i, s = w.tag
            results[i][s] = out
            if on_sample is not None:
                on_sample(i, s, out)

        pending = deque(
            self.make_work(
                p,
                replace(sampling, max_new_tokens=budgets[i]),
                sample_seed(sampling.seed, i, s),
                done,
                tag=(i, s),
            )
            for i, p in enumerate(prompt_ids)
            for s in range(n)
        )

        def take(limit: int, max_len: int) -> list[Work]:
            got: list[Work] = []
            while pending and len(got) < limit and pending[0].max_len <= max_len:
                got.append(pending.popleft())
            return got

        while pending:  # the cache needs no more rows than there are sequences
            self.run_batch(take, capacity=min(self.max_batch_size, len(pending)))
        return results  # type: ignore[return-value]

    def max_new_tokens_for(self, prompt_len: int, max_new_tokens: int) -> int:
        """What an Engine-API caller gets over HTTP too: a prompt SGLang refuses raises its error (RuleError,
        a ValueError); the budget is cut to what the context leaves (request_rules.fit_max_new_tokens)."""
        request_rules.prompt_length(prompt_len, self.context_length)
        return request_rules.fit_max_new_tokens(prompt_len, max_new_tokens, self.context_length)

    def make_work(self, prompt: list[int], sampling: SamplingParams, seed: int | None, done, tag=None) -> Work:
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
        stops = request_rules.stop_tokens(sampling.stop_token_ids, self.spec.eos_token_ids, sampling.ignore_eos)
        if sampling.return_routed_experts and not self.spec.num_experts:
            raise ValueError(
                f"return_routed_experts needs an MoE model; {self.model_dir} ({self.spec.model_type}) has no experts"
            )
        return Work(list(prompt), sampling, int(seed), done, stops, tag)

    def run_batch(
        self, take: Callable[[int, int], list[Work]], max_len_hint: int = 0, capacity: int | None = None
    ) -> int:
        """Run one continuous batch: pull work with take(limit, max_len) until nothing is active.

        take must return only items with item.max_len <= max_len (FIFO; stop at the first that
        does not fit, so large requests are not starved). Returns the number of sequences finished.
        """
        with self._lock, torch.inference_mode():
            cap = min(capacity or self.max_batch_size, self.max_batch_size)
            first = take(cap, 1 << 30)
            if not first:
                return 0
            max_len = max(max_len_hint, max(w.max_len for w in first))
            max_len = -(-max_len // 64) * 64
            max_new = max(max(w.sampling.max_new_tokens for w in first), 1)
            rows = _Rows(cap, width=max(max_new, max_len), max_stops=max(64, max(len(w.stop_ids) for w in first)))
            cache = KVCache(self.spec, cap, max_len, self.model.dtype)
            try:
                finished = self._admit(rows, cache, first)
                while rows.n:
                    finished += self._decode_step(rows, cache)
                    free = cap - rows.n
                    if free:
                        finished += self._admit(rows, cache, [w for w in take(free, max_len) if self._fits(w, rows)])
            except Exception as err:
                self._abort_rows(rows, err)
                raise
            return finished

    @staticmethod
    def _abort_rows(rows: _Rows, err: Exception) -> None:
        """Hand every in-flight sequence an 'abort' so no caller waits forever on a failed batch."""
        for w in rows.work:
            if w is not None:
                w.meta["error"] = f"{type(err).__name__}: {err}"
                w.done(w, GenerateOutput([], [], "abort"))

    def _fits(self, w: Work, rows: _Rows) -> bool:
        if w.sampling.max_new_tokens > rows.width or len(w.stop_ids) > rows.stops.shape[1]:
            raise EngineError("work item does not fit the running batch; take() must respect max_len")
        return True

    def _admit(self, rows: _Rows, cache: KVCache, items: list[Work]) -> int:
        """Prefill new items into rows [n, n+m), sample their first token; returns how many finished."""
        finished = 0
        live = []
        for w in items:
            if w.sampling.max_new_tokens == 0:  # scoring-only request: nothing to generate
                w.done(w, GenerateOutput([], [], "length"))
                finished += 1
            else:
                live.append(w)
        if not live:
            return finished
        sl = rows.admit(live)
        lengths = rows.lens[sl]
        T = int(lengths.max())
        tokens = torch.zeros(len(live), T, dtype=torch.int64)
        for j, w in enumerate(live):
            tokens[j, : len(w.prompt_ids)] = torch.tensor(w.prompt_ids)
        routes = Routes() if any(w.sampling.return_routed_experts for w in live) else None
        hidden = self.model.forward(
            tokens, torch.arange(T).expand(len(live), T), cache, rows=torch.arange(sl.start, sl.stop), routes=routes
        )
        if routes is not None:
            chosen = routes.stacked().to(torch.int16 if self.spec.num_experts <= 32767 else torch.int32)
            for j, w in enumerate(live):
                w.meta["prompt_routes"] = chosen[j, : len(w.prompt_ids)].clone()
            if rows.out_routes is None:
                layers_k = chosen.shape[-2:]
                rows.out_routes = torch.zeros(rows.width, len(rows.work), *layers_k, dtype=chosen.dtype)
        last = hidden[torch.arange(len(live)), lengths - 1]
        return finished + self._sample_and_record(rows, cache, self.model.logits(last), sl.start, sl.stop)

    def _decode_step(self, rows: _Rows, cache: KVCache) -> int:
        n = rows.n
        attn_len = rows.max_lens + 1
        rows.g += 1  # a new global step: every active row writes ring slot g % width
        routes = Routes() if rows.out_routes is not None else None
        hidden = self.model.decode(rows.next_tok[:n], rows.lens[:n], cache, attn_len, routes)
        if routes is not None and rows.out_routes is not None:
            rows.out_routes[rows.g % rows.width, :n] = routes.stacked()
        rows.lens[:n] += 1
        rows.max_lens += 1
        return self._sample_and_record(rows, cache, self.model.logits(hidden), 0, n)

    def _sample_and_record(self, rows: _Rows, cache: KVCache, logits: torch.Tensor, start: int, stop: int) -> int:
        """Sample the next token of rows [start, stop), record it, finish the rows that ended."""
        sl = slice(start, stop)
        tok, lp = sample_next(
            logits,
            rows.temperature[sl],
            rows.top_p[sl],
            rows.top_k[sl],
            rows.seeds[sl],
            rows.ngen[sl],
            all_greedy=rows.all_greedy,
        )
        slot = rows.g % rows.width
        rows.out_tok[slot, sl] = tok
        rows.out_lp[slot, sl] = lp
        rows.ngen[sl] += 1
        rows.next_tok[sl] = tok
        if not rows.any_stops and rows.g < rows.min_end_g:  # no row can end this step: skip the checks
            return 0
        stopped = (tok[:, None] == rows.stops[sl]).any(dim=1)
        ended = stopped | (rows.ngen[sl] >= rows.max_new[sl])
        if not bool(ended.any()):
            return 0
        done_rows = (torch.nonzero(ended).view(-1) + start).tolist()
        reasons = dict(zip(done_rows, stopped[ended].tolist()))
        for r in sorted(done_rows, reverse=True):  # highest first keeps lower indices valid while compacting
            w = rows.work[r]
            ids, lps = rows.outputs(r)
            out = GenerateOutput(ids, lps, "stop" if reasons[r] else "length")
            if w.sampling.return_routed_experts:
                out.routed_experts = compact_expert_ids(rows.routes(r), self.spec.num_experts)
            w.meta["matched"] = ids[-1] if reasons[r] else None
            self._release(rows, cache, r)
            w.done(w, out)
        return len(done_rows)

    def _release(self, rows: _Rows, cache: KVCache, r: int) -> None:
        last = rows.n - 1
        if r != last:
            rows.move(last, r)
            for t in cache.k + cache.v:
                t[r] = t[last]
        rows.work[last] = None
        rows.n -= 1
        rows.refresh_flags()

    # ------------------------------------------------------------------ score
    def score(self, ids: list[list[int]], response_start: list[int], top_k: int = 0) -> list[ScoreOutput]:
        """Log-probs of ids[i][response_start[i]:] (teacher alignment: position p predicts token p + 1).

        A sequence SGLang would refuse as a prompt (too long for the context) raises its error, as over HTTP."""
        check_prompts(ids, self.spec.vocab_size)
        for seq in ids:
            request_rules.prompt_length(len(seq), self.context_length)
        return self.score_positions(ids, response_start, top_k)

    def score_positions(
        self, ids: list[list[int]], response_start: list[int], top_k: int = 0, temperature: float = 1.0
    ) -> list[ScoreOutput]:
        """score without the context check (the server's own log-prob passes, after its request checks)."""
        check_prompts(ids, self.spec.vocab_size)
        if len(response_start) != len(ids):
            raise ValueError(f"response_start has {len(response_start)} entries for {len(ids)} sequences")
        for i, (seq, st) in enumerate(zip(ids, response_start)):
            if not 1 <= st <= len(seq):
                raise ValueError(
                    f"response_start[{i}]={st} must be in [1, len(ids[{i}])={len(seq)}] (the first token has no log-prob)"
                )
        if top_k < 0 or top_k > self.spec.vocab_size:
            raise ValueError(f"top_k={top_k} must be in [0, vocab_size={self.spec.vocab_size}]")
        out: list[ScoreOutput | None] = [None] * len(ids)
        with self._lock, torch.inference_mode():
            for chunk in _token_budget_chunks([len(s) for s in ids], self.max_score_tokens):
                self._score_chunk(ids, response_start, chunk, top_k, temperature, out)
        return out  # type: ignore[return-value]

    def _score_chunk(self, ids, starts, chunk: list[int], top_k: int, temperature: float, out) -> None:
        """One padded forward for the chunk; the LM head runs only on the response positions.

        Response token j of sequence i is scored by the logits at position starts[i] + j - 1
        (teacher/alignment.py); the index tensors below are that formula, vectorised.
        """
        lens = torch.tensor([len(ids[i]) for i in chunk])
        st = torch.tensor([starts[i] for i in chunk])
        T = int(lens.max())
        flat = np.fromiter(itertools.chain.from_iterable(ids[i] for i in chunk), dtype=np.int64, count=int(lens.sum()))
        tokens = torch.zeros(len(chunk), T, dtype=torch.int64)
        tokens[torch.arange(T)[None, :] < lens[:, None]] = torch.from_numpy(flat)
        hidden = self.model.forward(tokens, torch.arange(T).expand(len(chunk), T))
        counts = lens - st
        rows_t = torch.repeat_interleave(torch.arange(len(chunk)), counts)
        first = torch.cumsum(counts, 0) - counts
        pos_t = torch.repeat_interleave(st - 1 - first, counts) + torch.arange(int(counts.sum()))
        lp = self.model.logits(hidden[rows_t, pos_t])
        if temperature != 1.0:
            lp = lp / temperature
        lp = lp.log_softmax(-1)
        picked = lp.gather(-1, tokens[rows_t, pos_t + 1][:, None]).squeeze(-1).tolist()
        top_ids = top_vals = None
        if top_k:
            tops = lp.topk(top_k, dim=-1)
            top_ids, top_vals = tops.indices.to(torch.int32).numpy(), tops.values.float().numpy()
        a = 0
        for i, c in zip(chunk, counts.tolist()):
            res = ScoreOutput(picked[a : a + c])
            if top_ids is not None and top_vals is not None:
                res.topk_ids, res.topk_logprobs = top_ids[a : a + c], top_vals[a : a + c]
            out[i] = res
            a += c

    # ------------------------------------------------------------------ weights
    def update_weights(
        self, *, named_tensors: Iterable[tuple[str, torch.Tensor]] | None = None, path: str | None = None, version: int
    ) -> None:
        """In place, between batches (takes the engine lock). Tensors use HF names."""
        if (named_tensors is None) == (path is None):
            raise ValueError("update_weights needs exactly one of named_tensors= or path=")
        with self._lock:
            if path is not None:
                if Path(path).name.endswith(".tmp"):  # exports are written to step_N.tmp, then renamed
                    raise ValueError(f"{path} is an export still being written; load the published step_N folder")
                new_cfg = read_config(path)
                if (
                    int(new_cfg["vocab_size"]) != self.spec.vocab_size
                    or new_cfg.get("model_type") != self.spec.model_type
                ):
                    raise ValueError(f"{path} is a different architecture from the served model {self.model_dir}")
                tensors = dict(iter_safetensors(path))  # read fully before touching the live weights
                self.model.load_tensors(tensors.items(), strict=True)
                self.model_dir = str(path)
            elif named_tensors is not None:
                items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
                self.model.load_tensors(items, strict=False)
            self.version = int(version)

    def health(self) -> bool:
        return not self._closed

    def close(self) -> None:
        self._closed = True


def _token_budget_chunks(lengths: list[int], budget: int) -> list[list[int]]:
    """Group sequence indices (sorted by length) so each padded chunk holds at most `budget` tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > budget:
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    return chunks
