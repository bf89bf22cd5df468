"""HttpEngine: the Engine protocol over SGLang-compatible HTTP servers (a fleet, or one router URL).

Every sample is its own request (`n=1`, a seed derived per (prompt, sample)), so a sample is the
unit of retry and of accounting: it is sent to the live server with the fewest requests in
flight; a transport error, timeout or 5xx marks that server dead and the sample is retried on
another after an exponential back-off, up to `max_retries` times. The step returns only when
every requested sample came back exactly once; otherwise it raises EngineError naming how many
samples were lost and why. When every server is down, the pool probes them until the request
deadline and then raises, naming each server and its last error. A 4xx is the caller's fault
and is not retried. Scoring (idempotent) sends batches of `score_batch_size` sequences per
request; a batch is the unit of retry there.

Dead servers are probed after a cool-down and rejoin when /health answers; if weights were
updated from disk meanwhile, the rejoining server first receives the current version.

The async work runs on a private event loop thread, so the synchronous Engine API can be called
from ordinary trainer code; one httpx.AsyncClient is reused for connection pooling.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import httpx
import orjson

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
from rlad_megatron.engines.fleet import AllServersDown, AllServersStale, ServerPool, StaleServer
from rlad_megatron.engines.protocol import decode_routed_experts, parse_finish_reason

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class StaleWeightsError(EngineError):
    """Every server restarted since the last weight sync: the trainer must sync again before generating."""


class _ClientError(Exception):
    """A 4xx answer: the request itself is wrong; retrying elsewhere would not help."""


class HttpEngine:
    def __init__(
        self,
        urls: list[str],
        api_key: str = "",
        max_concurrency: int = 64,
        request_timeout_s: float = 300.0,
        max_retries: int = 3,
        backoff_s: float = 0.2,
        cooldown_s: float = 2.0,
        connect_timeout_s: float = 5.0,
        score_batch_size: int = 8,
        health_timeout_s: float = 30.0,
        context_length: int | None = None,
        routes_shape: tuple[int, int] | None = None,
    ):
        self.context_length = context_length
        self.routes_shape = routes_shape
        """(MoE layers, experts per token) of the served model: needed to shape returned routed experts."""
        """The servers' context length (SGLang's context_len); when known, generate cuts max_new_tokens to what
        the context leaves and refuses over-long prompts before sending, as the embedded engine does."""
        self.pool = ServerPool(
            list(urls), cooldown_s=cooldown_s, probe_timeout_s=health_timeout_s, on_rejoin=self._resync
        )
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_concurrency, self.max_retries, self.backoff_s = max_concurrency, max_retries, backoff_s
        self.request_timeout_s = request_timeout_s
        self.score_batch_size = score_batch_size
        self.timeout = httpx.Timeout(request_timeout_s, connect=connect_timeout_s)
        self.version, self.weights_path = 0, ""
        self.sync_urls = list(self.pool.servers)  # servers themselves (a fleet behind a router sets them)
        self.sync_generation = 0  # bumped each time the weight-sync groups are rebuilt (engines/weight_sync.py)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rlad-http-engine", daemon=True)
        self._thread.start()
        self._client: httpx.AsyncClient | None = None
        self.stats: Counter = Counter()

    # ------------------------------------------------------------------ plumbing
    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.max_concurrency, max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        return self._client

    async def _post_once(self, path: str, payload: dict[str, Any], deadline: float) -> tuple[str, Any]:
        server = await self.pool.pick(self._http(), self.headers, deadline)
        server.inflight += 1
        try:
            r = await self._http().post(server.url + path, json=payload, headers=self.headers)
        except httpx.HTTPError as err:
            self.pool.mark_dead(server.url, f"{type(err).__name__}: {err}")
            raise
        finally:
            server.inflight -= 1
        if r.status_code in RETRYABLE_STATUS:
            self.pool.mark_dead(server.url, f"HTTP {r.status_code}")
            raise httpx.HTTPStatusError(
                f"{server.url}{path} returned {r.status_code}: {r.text[:200]}", request=r.request, response=r
            )
        if r.status_code >= 400:
            raise _ClientError(f"{server.url}{path} refused the request ({r.status_code}): {r.text[:300]}")
        return server.url, orjson.loads(r.content)

    async def _post(self, path: str, payload: dict[str, Any], sem: asyncio.Semaphore, parse=lambda body: body) -> Any:
        """POST with failover and exponential back-off; `parse` errors (truncated, aborted or inconsistent
        answers) are retried too. Raises EngineError with the last cause."""
        deadline = time.monotonic() + self.request_timeout_s
        last = ""
        for attempt in range(self.max_retries + 1):
            try:
                async with sem:
                    url, body = await self._post_once(path, payload, deadline)
                stale = self._stale_version(body)
                if stale is not None:  # a restarted server: out until a weight sync reaches it
                    self.pool.mark_dead(url, f"answered with weights version {stale}, not {self.version}", stale=True)
                    raise ValueError(f"{url} serves weights version {stale}, not {self.version}")
                return parse(body)
            except AllServersStale as err:
                raise StaleWeightsError(str(err)) from None
            except AllServersDown as err:
                raise EngineError(str(err)) from None
            except _ClientError as err:
                raise EngineError(str(err)) from None
            except (httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as err:
                last = f"{type(err).__name__}: {err}"
                self.stats["retries"] += 1
                await asyncio.sleep(min(self.backoff_s * 2**attempt, 5.0))
        raise EngineError(f"failed after {self.max_retries + 1} attempts; last error: {last}")

    def _stale_version(self, body: Any) -> str | None:
        """The weight version an answer was generated with, if it is not the synced one (SGLang and `rlad serve`
        report it in meta_info); None when it matches or nothing has been synced yet."""
        if not self.version:
            return None
        for item in body if isinstance(body, list) else [body]:
            got = item.get("meta_info", {}).get("weight_version") if isinstance(item, dict) else None
            if got is not None and str(got) != str(self.version):
                return str(got)
        return None

    async def _gather(self, keys: list[Any], coros) -> dict[Any, Any]:
        """Run one coroutine per key; return {key: result} or raise naming every lost key's cause."""
        results = await asyncio.gather(*coros, return_exceptions=True)
        got: dict[Any, Any] = {}
        lost: Counter[str] = Counter()
        for key, res in zip(keys, results):
            if isinstance(res, BaseException):
                lost[str(res).split("\n")[0][:300]] += 1
            else:
                if key in got:
                    raise EngineError(f"sample {key} came back twice")
                got[key] = res
        stale = next((r for r in results if isinstance(r, StaleWeightsError)), None)
        if stale is not None:
            raise StaleWeightsError(f"lost {sum(lost.values())} of {len(keys)} requests: {stale}")
        if lost:
            reasons = "; ".join(f"{c} x {msg}" for msg, c in lost.most_common(5))
            raise EngineError(f"lost {sum(lost.values())} of {len(keys)} requests: {reasons}")
        return got

    # ------------------------------------------------------------------ Engine API
    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, n: int = 1, on_sample: OnSample | None = None
    ) -> list[list[GenerateOutput]]:
        """One request per sample; `on_sample` fires (on the client's event-loop thread) as each one comes back."""
        check_prompts(prompt_ids)
        if n < 1:
            raise ValueError(f"n={n} must be >= 1")
        keys = [(i, s) for i in range(len(prompt_ids)) for s in range(n)]
        per_prompt = [replace(sampling, max_new_tokens=self.max_new_tokens_for(len(p), sampling)) for p in prompt_ids]
        got = self._run(self._generate(prompt_ids, per_prompt, keys, on_sample))
        return [[got[(i, s)] for s in range(n)] for i in range(len(prompt_ids))]

    def max_new_tokens_for(self, prompt_len: int, sampling: SamplingParams) -> int:
        """The budget a prompt gets: what the context leaves (engines/request_rules.py), when it is known."""
        if self.context_length is None:
            return sampling.max_new_tokens
        request_rules.prompt_length(prompt_len, self.context_length)
        return request_rules.fit_max_new_tokens(prompt_len, sampling.max_new_tokens, self.context_length)

    async def _generate(
        self, prompt_ids, per_prompt: list[SamplingParams], keys, on_sample=None
    ) -> dict[Any, GenerateOutput]:
        sem = asyncio.Semaphore(self.max_concurrency)

        async def one(i: int, s: int) -> GenerateOutput:
            out = await self._one_sample(prompt_ids[i], per_prompt[i], sample_seed(per_prompt[i].seed, i, s), sem)
            if on_sample is not None:
                on_sample(i, s, out)
            return out

        return await self._gather(keys, [one(i, s) for i, s in keys])

    async def _one_sample(self, prompt: list[int], sp: SamplingParams, seed: int | None, sem) -> GenerateOutput:
        params = {
            "temperature": sp.temperature,
            "top_p": sp.top_p,
            "top_k": sp.top_k,
            "max_new_tokens": sp.max_new_tokens,
            "stop_token_ids": list(sp.stop_token_ids),
            "ignore_eos": sp.ignore_eos,
        }
        if seed is not None:
            params["sampling_seed"] = seed
        payload = {"input_ids": prompt, "sampling_params": params, "return_logprob": True}
        routes = None
        if sp.return_routed_experts:
            if self.routes_shape is None:
                raise ValueError("return_routed_experts needs the served model's (layers, k): pass routes_shape")
            payload["return_routed_experts"] = True
            routes = (len(prompt), *self.routes_shape)
        return await self._post(
            "/generate", payload, sem, lambda b: parse_generate_response(b, sp.max_new_tokens, routes)
        )

    def score(self, ids: list[list[int]], response_start: list[int], top_k: int = 0) -> list[ScoreOutput]:
        check_prompts(ids)
        if len(response_start) != len(ids):
            raise ValueError(f"response_start has {len(response_start)} entries for {len(ids)} sequences")
        if self.context_length is not None:
            for seq in ids:
                request_rules.prompt_length(len(seq), self.context_length)
        return self._run(self._score(ids, response_start, top_k))

    async def _score(self, ids, starts, top_k: int) -> list[ScoreOutput]:
        """Batches of `score_batch_size` sequences per request (SGLang batch form, max_new_tokens=0)."""
        from rlad_megatron.teacher.alignment import (
            logprob_start_len_for,
            response_from_input_logprobs,
        )

        sem = asyncio.Semaphore(self.max_concurrency)

        async def one_batch(idx: list[int]) -> list[ScoreOutput]:
            seqs = [ids[i] for i in idx]
            # one integer start for the batch (sglang-router only forwards a scalar logprob_start_len)
            common = min(logprob_start_len_for(starts[i]) for i in idx)
            payload = {
                "input_ids": seqs,
                "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
                "return_logprob": True,
                "logprob_start_len": common,
                "top_logprobs_num": top_k,
            }

            def parse(body):
                if not isinstance(body, list) or len(body) != len(idx):
                    raise ValueError(f"expected {len(idx)} outputs for a scoring batch")
                res = []
                for i, item in zip(idx, body):
                    meta = item["meta_info"]
                    tops = meta.get("input_top_logprobs") if top_k else None
                    res.append(
                        ScoreOutput(
                            *response_from_input_logprobs(meta["input_token_logprobs"], ids[i], starts[i], tops, common)
                        )
                    )
                return res

            return await self._post("/generate", payload, sem, parse)

        batches = [
            list(range(k, min(k + self.score_batch_size, len(ids)))) for k in range(0, len(ids), self.score_batch_size)
        ]
        got = await self._gather(list(range(len(batches))), [one_batch(b) for b in batches])
        return [out for k in range(len(batches)) for out in got[k]]

    def update_weights(self, *, named_tensors=None, path: str | None = None, version: int) -> None:
        """From disk: every live server loads the HF folder `path` (/update_weights_from_disk). Tensors travel
        over the wire with the distributed protocol instead (engines/weight_sync.py, driven by the trainer)."""
        if named_tensors is not None or path is None:
            raise ValueError(
                "HttpEngine.update_weights needs path= (an HF folder under the servers' weights root); "
                "tensors reach servers through rollout.sync=distributed (engines/weight_sync.py)"
            )
        self._run(self._update_all(str(path), int(version)))
        self.version, self.weights_path = int(version), str(path)

    # ------------------------------------------------------------------ distributed weight sync (rank 0's part)
    def sync_members(self) -> tuple[list[str], bool]:
        """The servers that take part in the next weight sync: every one answering /health now, dead-marked
        ones included (a restarted server joins the sync and then serves again); and whether one of them
        restarted since the last sync (it reports another weights version), so the sync groups must be rebuilt
        even though the list of URLs is the same."""

        async def probe(url: str) -> str | None:
            try:
                if (
                    await self._http().get(url + "/health", headers=self.headers, timeout=self.pool.probe_timeout_s)
                ).status_code != 200:
                    return None
                info = await self._http().get(url + "/model_info", headers=self.headers, timeout=30.0)
                return str(info.json().get("weight_version"))
            except (httpx.HTTPError, ValueError):
                return None

        async def probe_all() -> list[str | None]:
            return await asyncio.gather(*(probe(u) for u in self.sync_urls))

        urls = list(self.sync_urls)
        deadline = time.monotonic() + self.request_timeout_s
        while True:  # a lone server being restarted (by its node agent) comes back within the request timeout
            versions = dict(zip(urls, self._run(probe_all())))
            members = [u for u in urls if versions[u] is not None]
            if members:
                break
            if time.monotonic() > deadline:
                raise EngineError(
                    f"no rollout server answered /health for {self.request_timeout_s:.0f} s; cannot "
                    "sync weights: " + ", ".join(urls)
                )
            time.sleep(1.0)
        restarted = bool(self.version) and any(versions[u] != str(self.version) for u in members)
        return members, restarted

    def synced(self, members: list[str], version: int, versions: dict[str, str]) -> None:
        """After a sync: every member must report `version`; members serve again, the others stay out."""
        stale = {u: v for u, v in versions.items() if v != str(version)}
        if stale:
            raise EngineError(
                f"after the weight sync to version {version} these servers report another version: {stale}"
            )
        for url in members:
            if url in self.pool.servers:
                self.pool.mark_ok(url)
        self.version, self.weights_path = int(version), ""

    async def _update_all(self, path: str, version: int) -> None:
        live = [s.url for s in self.pool.servers.values() if s.alive]
        if not live:
            raise EngineError("no live server to update")
        results = await asyncio.gather(*(self._update_one(u, path, version) for u in live), return_exceptions=True)
        errors = [f"{u}: {r}" for u, r in zip(live, results) if isinstance(r, BaseException)]
        if errors:
            raise EngineError("weight update failed on " + "; ".join(errors))

    async def _update_one(self, url: str, path: str, version: int) -> None:
        payload = {"model_path": path, "weight_version": str(version), "flush_cache": True}
        r = await self._http().post(url + "/update_weights_from_disk", json=payload, headers=self.headers)
        if r.status_code != 200 or not r.json().get("success", False):
            raise EngineError(f"update_weights_from_disk returned {r.status_code}: {r.text[:300]}")

    async def _resync(self, url: str) -> None:
        """Before a server rejoins: make sure it serves the current weights version. From disk it is pushed the
        folder now; with distributed sync a stale server stays out until the next sync includes it."""
        if not self.weights_path and not self.version:
            return
        r = await self._http().get(url + "/model_info", headers=self.headers, timeout=10.0)
        if str(r.json().get("weight_version")) == str(self.version):
            return
        if not self.weights_path:
            raise StaleServer(
                f"{url} serves weights version {r.json().get('weight_version')}, not {self.version}; "
                "it rejoins after the next weight sync"
            )
        await self._update_one(url, self.weights_path, self.version)

    def health(self) -> bool:
        async def check():
            await self.pool.revive_due(self._http(), self.headers, force=True)
            return bool(self.pool.live())

        return self._run(check())

    def close(self) -> None:
        if self._client is not None:
            self._run(self._client.aclose())
            self._client = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def parse_generate_response(
    body: dict[str, Any], max_new_tokens: int, routes: tuple[int, int, int] | None = None
) -> GenerateOutput:
    """One SGLang /generate answer -> GenerateOutput, checking it is complete and consistent.

    `routes` = (prompt length, layers, k) when routed experts were asked for (meta_info.routed_experts)."""
    if isinstance(body, list):
        if len(body) != 1:
            raise ValueError(f"expected one output, got {len(body)}")
        body = body[0]
    meta = body["meta_info"]
    ids = [int(t) for t in body["output_ids"]]
    lps = [float(e[0]) for e in meta["output_token_logprobs"]]
    echoed = [int(e[1]) for e in meta["output_token_logprobs"]]
    if echoed != ids:
        raise ValueError("output_token_logprobs token ids differ from output_ids")
    reason = parse_finish_reason(meta)
    if reason == "abort":
        raise ValueError(f"server aborted the request: {meta.get('finish_reason')}")
    if len(ids) > max_new_tokens:
        raise ValueError(f"server returned {len(ids)} tokens for max_new_tokens={max_new_tokens}")
    out = GenerateOutput(ids, lps, reason)
    if routes is not None:
        if not meta.get("routed_experts"):
            raise ValueError(
                "server returned no routed_experts: start SGLang with --enable-return-routed-experts "
                "(rlad serve returns them for MoE models)"
            )
        prompt_len, layers, topk = routes
        out.routed_experts = decode_routed_experts(meta["routed_experts"], prompt_len + len(ids) - 1, layers, topk)
    return out
