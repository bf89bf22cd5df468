"""`rlad serve --model DIR`: the embedded engine behind the subset of SGLang's native HTTP API.

Endpoints: POST /generate, GET /health, GET /health_generate, POST /update_weights_from_disk,
POST|GET /flush_cache, GET /model_info, GET /server_info (and their older
get_* names), GET /v1/models, and the distributed
weight sync (POST /init_weights_update_group, /begin_weight_update, /update_weights_from_distributed,
/end_weight_update, /destroy_weights_update_group; engines/weight_receiver.py). Field names,
defaults and response shapes follow SGLang (engines/protocol.py has the mapping), so the same
client talks to either, directly or through sglang-router.

Concurrency: HTTP handlers enqueue one work item per sample; a single scheduler thread runs the
engine's continuous-batching loop, pulling queued items into free KV-cache rows, and resolves
each request's futures. A weight update pauses admission, waits for the running batch to drain,
swaps the weights and resumes; requests keep queueing meanwhile.

Security defaults: binds 127.0.0.1; `--api-key` (or env RLAD_API_KEY) requires
`Authorization: Bearer <key>` on every endpoint; `/update_weights_from_disk` accepts only folders
under `--weights-root` (none configured: refused) and loads safetensors only; every request is
validated and bad input gets a 4xx with {"error": {"message": ...}} while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from rlad_megatron.engines import serve_args
from rlad_megatron.engines.base import GenerateOutput, SamplingParams, sample_seed
from rlad_megatron.engines.protocol import (
    GenRequest,
    RequestError,
    encode_routed_experts,
    finish_reason,
    parse_generate,
    triples,
)
from rlad_megatron.engines.weight_receiver import WeightReceiver

MAX_BODY_BYTES = 64 << 20


class Scheduler:
    """Feeds queued work into EmbeddedEngine.run_batch from one background thread."""

    def __init__(self, engine):
        self.engine = engine
        self.queue: deque = deque()
        self.cv = threading.Condition()
        self.paused = False
        self.stopped = False
        self.thread = threading.Thread(target=self._loop, name="rlad-scheduler", daemon=True)
        self.thread.start()

    def submit(self, work) -> None:
        with self.cv:
            self.queue.append(work)
            self.cv.notify()

    def _take(self, limit: int, max_len: int) -> list[Any]:
        got: list[Any] = []
        with self.cv:
            while not self.paused and self.queue and len(got) < limit and self.queue[0].max_len <= max_len:
                got.append(self.queue.popleft())
        return got

    def _loop(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.stopped or (self.queue and not self.paused))
                if self.stopped:
                    return
            try:
                self.engine.run_batch(self._take)
            except Exception as err:  # noqa: BLE001 (a failed batch must not kill the server: fail its requests)
                self._fail_all(err)

    def _fail_all(self, err: Exception) -> None:
        with self.cv:
            items, self.queue = list(self.queue), deque()
        for w in items:
            w.meta["error"] = str(err)
            w.done(w, GenerateOutput([], [], "abort"))

    def run_paused(self, fn):
        """Stop admitting work, run fn once the running batch drained (fn takes the engine lock), resume."""
        with self.cv:
            self.paused = True
        try:
            return fn()
        finally:
            with self.cv:
                self.paused = False
                self.cv.notify_all()

    def stop(self) -> None:
        with self.cv:
            self.stopped = True
            self.cv.notify_all()


def _error(message: str, status: int):
    return JSONResponse({"error": {"message": message}}, status_code=status)


def _rows(values) -> list:
    """Top-k rows as plain lists of Python numbers (JSON), from an engine's numpy array."""
    return values.tolist() if hasattr(values, "tolist") else list(values)


def _inside(path: str, root: str) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, base]) == base


class ServerState:
    def __init__(
        self,
        engine,
        model_dir: str,
        api_key: str = "",
        weights_root: str = "",
        tokenizer=None,
        allow_auto_truncate: bool = False,
    ):
        self.engine, self.model_dir = engine, str(model_dir)
        self.allow_auto_truncate = allow_auto_truncate
        self.api_key, self.weights_root = api_key, weights_root
        self.tokenizer = tokenizer
        self.weight_version = str(engine.version)
        self.scheduler = Scheduler(engine)
        self.max_context = engine.spec.max_positions
        self.receiver = WeightReceiver(self.apply_received)

    def apply_received(self, named_tensors, version: str | None) -> None:
        """Swap in the tensors of one distributed weight update, between batches."""
        new_version = int(version) if version is not None and version.isdigit() else self.engine.version + 1
        self.scheduler.run_paused(lambda: self.engine.update_weights(named_tensors=named_tensors, version=new_version))
        self.weight_version = version if version is not None else str(new_version)

    async def generate(self, reqs: list[GenRequest]) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        n, B = reqs[0].n, len(reqs)
        futures = []
        for j in range(n):  # SGLang order for n > 1: the batch repeated n times
            for r in reqs:
                fut = loop.create_future()
                futures.append(fut)
                sp = SamplingParams(
                    r.temperature,
                    r.top_p,
                    r.top_k,
                    r.max_new_tokens,
                    tuple(r.stop_token_ids),
                    None,
                    r.ignore_eos,
                    # a dense model returns no routes, as SGLang without a routed-experts capturer
                    return_routed_experts=r.return_routed_experts and bool(self.engine.spec.num_experts),
                )
                seed = r.seed if n == 1 else sample_seed(r.seed, 0, j)

                def done(w, out, fut=fut):
                    loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result((w, out)))

                self.scheduler.submit(self.engine.make_work(r.input_ids, sp, seed, done))
        results = await asyncio.gather(*futures)
        inputs = await self._input_scores(reqs)
        outputs = []
        for k, (w, out) in enumerate(results):
            if "error" in w.meta:
                raise RuntimeError(w.meta["error"])
            outputs.append(await self._format(reqs[k % B], w, out, time.perf_counter() - t0, inputs.get(k % B)))
        return outputs

    async def _input_scores(self, reqs: list[GenRequest]) -> dict[int, Any]:
        """Prompt log-probs of every request that asked for them, in one batched engine.score call.

        Entries cover input_ids[logprob_start_len:] (the first one None, as SGLang pads it), so only requests
        with at least two such tokens need a forward pass."""
        todo = [i for i, r in enumerate(reqs) if r.return_logprob and r.logprob_start_len + 1 < len(r.input_ids)]
        if not todo:
            return {}
        top_k = max(reqs[i].top_logprobs_num for i in todo)
        scores = await asyncio.to_thread(
            self.engine.score_positions,
            [reqs[i].input_ids for i in todo],
            [reqs[i].logprob_start_len + 1 for i in todo],
            top_k,
        )
        return dict(zip(todo, scores))

    async def _format(self, r: GenRequest, w, out: GenerateOutput, latency: float, input_score=None) -> dict[str, Any]:
        ids = out.response_ids
        if out.finish_reason == "stop":
            fr = finish_reason("stop", matched=w.meta.get("matched"))
        else:
            fr = finish_reason("length", length=len(ids))
        meta: dict[str, Any] = {
            "id": r.rid or uuid.uuid4().hex,
            "finish_reason": fr,
            "prompt_tokens": len(r.input_ids),
            "completion_tokens": len(ids),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
            "e2e_latency": latency,
        }
        if r.return_logprob:
            await self._add_logprobs(meta, r, out, input_score)
        if out.routed_experts is not None:
            meta["routed_experts"] = encode_routed_experts(out.routed_experts[r.routed_experts_start_len :])
        text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""
        return {"text": text, "output_ids": ids, "meta_info": meta}

    async def _add_logprobs(self, meta: dict[str, Any], r: GenRequest, out: GenerateOutput, sc) -> None:
        P, k = len(r.input_ids), r.top_logprobs_num
        start = r.logprob_start_len
        # SGLang pads the first returned input position with None; logprob_start_len == len(input): no entries
        in_lp: list[float | None] = [None] if start < P else []
        in_top: list[Any] = [None] if start < P else []
        if sc is not None:
            in_lp += sc.logprobs
            if k:
                in_top += [triples(v[:k], i[:k]) for v, i in zip(_rows(sc.topk_logprobs), _rows(sc.topk_ids))]
        meta["input_token_logprobs"] = triples(in_lp, r.input_ids[start:])
        meta["output_token_logprobs"] = triples(out.logprobs, out.response_ids)
        if k:
            meta["input_top_logprobs"] = in_top
            out_top: list[Any] = []
            if out.response_ids:
                temp = r.temperature if r.temperature > 0 else 1.0
                sc = (
                    await asyncio.to_thread(self.engine.score_positions, [r.input_ids + out.response_ids], [P], k, temp)
                )[0]
                out_top = [triples(v, i) for v, i in zip(_rows(sc.topk_logprobs), _rows(sc.topk_ids))]
            meta["output_top_logprobs"] = out_top

    def update_from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise RequestError("model_path must be a non-empty string")
        if body.get("load_format") not in (None, "auto", "safetensors"):
            raise RequestError(f"load_format={body.get('load_format')!r} is not supported; only safetensors")
        if not self.weights_root:
            raise RequestError("this server was started without --weights-root: disk weight updates are disabled", 403)
        if not _inside(path, self.weights_root):
            raise RequestError(f"model_path {path!r} is outside the allowed weights root", 403)
        version = body.get("weight_version")
        if version is not None and not isinstance(version, (str, int)):
            raise RequestError("weight_version must be a string")
        new_version = int(version) if version is not None and str(version).isdigit() else self.engine.version + 1

        def swap():
            self.engine.update_weights(path=path, version=new_version)

        self.scheduler.run_paused(swap)
        self.weight_version = str(version) if version is not None else str(new_version)
        return {"success": True, "message": f"loaded weights from {path}", "num_paused_requests": 0}

    async def health_generate(self) -> bool:
        reqs = [GenRequest([0], temperature=0.0, max_new_tokens=1, ignore_eos=True)]
        out = await asyncio.wait_for(self.generate(reqs), timeout=60)
        return len(out[0]["output_ids"]) == 1


def create_app(state: ServerState):
    app = FastAPI(title="rlad embedded engine", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if state.api_key:
            got = request.headers.get("authorization", "")
            if not hmac.compare_digest(got.encode(), f"Bearer {state.api_key}".encode()):
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            return _error(f"request body larger than {MAX_BODY_BYTES} bytes", 413)
        return await call_next(request)

    async def read_json(request: Request) -> Any:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise RequestError(f"request body larger than {MAX_BODY_BYTES} bytes", 413)
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise RequestError(f"request body is not valid JSON: {err}") from None

    @app.post("/generate")
    async def generate(request: Request):
        try:
            body = await read_json(request)
            reqs = parse_generate(
                body,
                state.engine.spec.vocab_size,
                state.max_context,
                tokenizer=state.tokenizer,
                allow_auto_truncate=state.allow_auto_truncate,
            )
            outs = await state.generate(reqs)
        except RequestError as err:
            return _error(str(err), err.status)
        prompts = body["input_ids"] if body.get("text") is None else body["text"]
        single = (isinstance(prompts, str) or isinstance(prompts[0], int)) and reqs[0].n == 1
        return JSONResponse(outs[0] if single else outs)

    @app.get("/health")
    async def health():
        return Response(status_code=200 if state.engine.health() else 503)

    @app.get("/health_generate")
    async def health_generate():
        ok = state.engine.health() and await state.health_generate()
        return Response(status_code=200 if ok else 503)

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise RequestError("request body must be a JSON object")
            result = await asyncio.to_thread(state.update_from_disk, body)
        except RequestError as err:
            return JSONResponse({"success": False, "message": str(err)}, status_code=err.status)
        except (OSError, ValueError, KeyError) as err:
            return JSONResponse({"success": False, "message": f"failed to load weights: {err}"}, status_code=400)
        return JSONResponse(result)

    def weight_sync_route(path: str, handler):
        """The distributed weight-sync endpoints (engines/weight_receiver.py): JSON object in, SGLang's
        {success, message} out, 400 when refused; the blocking receive runs off the event loop."""

        async def endpoint(request: Request):
            try:
                body = await read_json(request) if await request.body() else {}
                if not isinstance(body, dict):
                    raise RequestError("request body must be a JSON object")
                return JSONResponse(await asyncio.to_thread(handler, body))
            except RequestError as err:
                return JSONResponse({"success": False, "message": str(err)}, status_code=400)
            except (RuntimeError, ValueError, OSError) as err:  # a failed rendezvous or broadcast
                return JSONResponse({"success": False, "message": f"{type(err).__name__}: {err}"}, status_code=400)

        app.add_api_route(path, endpoint, methods=["POST"])

    receiver = state.receiver
    weight_sync_route("/init_weights_update_group", receiver.init_group)
    weight_sync_route("/destroy_weights_update_group", receiver.destroy_group)
    weight_sync_route("/begin_weight_update", lambda body: receiver.begin())
    weight_sync_route("/update_weights_from_distributed", receiver.receive)
    weight_sync_route("/end_weight_update", lambda body: receiver.end())

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        return PlainTextResponse("Cache flushed.\n")  # no prefix cache to flush

    @app.get("/model_info")
    @app.get("/get_model_info")  # SGLang's older name, still served by 0.5.23
    async def get_model_info():
        return {
            "model_path": state.engine.model_dir,
            "tokenizer_path": state.model_dir,
            "is_generation": True,
            "weight_version": state.weight_version,
            "max_context_length": state.max_context,
            "vocab_size": state.engine.spec.vocab_size,
        }

    @app.get("/server_info")
    @app.get("/get_server_info")  # SGLang's older name, still served by 0.5.23
    async def get_server_info():
        return {
            "model_path": state.engine.model_dir,
            "weight_version": state.weight_version,
            "max_total_num_tokens": state.max_context * state.engine.max_batch_size,
            "engine": "rlad-embedded",
            "tp_size": 1,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_dir, "object": "model", "owned_by": "rlad"}]}

    return app


def add_arguments(parser) -> None:
    """Its own flags and the SGLang launch flags the node agent passes (engines/serve_args.py)."""
    serve_args.add_arguments(parser)


def build_state(args) -> ServerState:
    """The engine behind the app; a ValueError names an SGLang flag this server cannot honour."""
    import torch

    from rlad_megatron.engines.embedded import EmbeddedEngine

    serve_args.check(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = EmbeddedEngine(
        args.model, max_batch_size=args.max_batch_size, dtype=getattr(torch, serve_args.torch_dtype(args))
    )
    max_context = serve_args.context_length(args, engine.spec.max_positions)
    tokenizer = None
    has_tokenizer = any((Path(args.model) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if has_tokenizer and not args.skip_tokenizer_init:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
    api_key = args.api_key if args.api_key is not None else os.environ.get("RLAD_API_KEY", "")
    state = ServerState(
        engine,
        args.model,
        api_key=api_key,
        weights_root=args.weights_root,
        tokenizer=tokenizer,
        allow_auto_truncate=args.allow_auto_truncate,
    )
    state.max_context = engine.context_length = max_context
    return state


def run(args) -> int:
    import uvicorn

    try:
        state = build_state(args)
    except ValueError as err:  # e.g. an SGLang flag it cannot honour: the message names it, no traceback
        print(f"rlad serve: {err}", file=sys.stderr)
        return 2
    if args.host not in ("127.0.0.1", "localhost", "::1") and not state.api_key:
        print(f"warning: serving on {args.host} without an API key; anyone who can reach the port can use it")
    print(
        f"rlad serve: {args.model} on http://{args.host}:{args.port} (api key {'on' if state.api_key else 'off'})",
        flush=True,
    )
    # keep-alive longer than the client pool's idle time, so pooled connections are not closed under it
    uvicorn.run(
        create_app(state), host=args.host, port=args.port, log_level="warning", access_log=False, timeout_keep_alive=75
    )
    state.scheduler.stop()
    return 0
