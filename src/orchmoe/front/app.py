"""The routing front: an OpenAI-compatible server that sends each request to the abstract-task adapter
its prompt routes to, on a vLLM server that has every adapter registered.

A request for the routed model (``"model"`` is the front's name, ``orchmoe`` unless set, or absent) is routed: its
prompt is tokenized as vLLM tokenizes it (the chat template for chat completions), the Task Router reads the prompt's
input embeddings (no layer of the model runs) and the request goes to vLLM with ``"model"`` set to the adapter of the
most likely abstract task. A request naming an adapter or the base passes through unchanged. Streams are relayed as
they come. The route is in the ``X-OrchMoE-Route`` response header (``none`` for a pass-through) and in the log.

Before any work a request is checked (``orchmoe.front.guard``): its API key, its size, its JSON and text, the prompt's
token count against the context; tokenizing and routing run in worker threads, never on the event loop, and the
requests in flight and queued for routing are bounded. ``/metrics`` serves vLLM's Prometheus metrics and the front's
own (``orchmoe.front.metrics``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors import safe_open
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import AutoConfig, AutoTokenizer

from ..serving import PromptRouter
from .guard import Admission, Refused, check_key, parse, read_body
from .metrics import CONTENT_TYPE, FrontMetrics
from .vllm import ManagedVLLM

log = logging.getLogger("orchmoe.front")
ROUTE_HEADER, ROUTING_MS_HEADER = "X-OrchMoE-Route", "X-OrchMoE-Routing-Ms"
MAX_BODY_BYTES = 4 * 2**20  # a 32k-token prompt is a few hundred KB of text or token ids
LONG_BODY = 16 * 2**10  # bytes: a body this large is tokenized in the long lane


def error(status: int, message: str, code: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": status}}, status_code=status,
                        headers=headers)  # fmt: skip


def load_input_embeddings(base: str | Path) -> torch.nn.Embedding:
    """The base model's input embedding table, read from its safetensors files alone (the model is not built)."""
    base = Path(base)
    config = AutoConfig.from_pretrained(base)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    found = []
    for file in sorted(base.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            found += [(file, key) for key in f.keys() if key.endswith("embed_tokens.weight")]  # noqa: SIM118
    if len(found) != 1:
        raise ValueError(f"expected one *embed_tokens.weight in {base}/*.safetensors, found {[k for _, k in found]}")
    file, key = found[0]
    with safe_open(file, "pt") as f:
        table = f.get_tensor(key)
    if vocab is not None and table.shape[0] != vocab:
        raise ValueError(f"{key} in {file} has {table.shape[0]} rows, the config's vocab_size is {vocab}")
    return torch.nn.Embedding.from_pretrained(table, freeze=True)


class Front:
    """Routes requests for ``name`` to the adapters of ``served`` on the vLLM server at ``upstream``, which serves
    ``base`` under the model name ``base_name`` (vLLM's default: the path or id it was started with); ``managed``:
    the vLLM process the front started, if it did."""

    def __init__(self, served: str | Path, base: str | Path, upstream: str, name: str = "orchmoe",
                 base_name: str | None = None, timeout: float = 300, managed: ManagedVLLM | None = None,
                 api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 admission: Admission | None = None) -> None:  # fmt: skip
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.admission = admission or Admission()
        self.metrics = FrontMetrics()
        self.router = PromptRouter.from_pretrained(served)
        self.adapters: list[str] = self.router.config["adapters"]
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.table = load_input_embeddings(base)
        self.name, self.base_name, self.upstream = name, base_name or str(base), upstream.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(timeout, connect=5))
        self.max_model_len: int | None = None
        self.managed = managed

    def app(self, lifespan: Any = None) -> Starlette:
        return Starlette(routes=[Route("/v1/completions", self.completions, methods=["POST"]),
                                 Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                                 Route("/v1/models", self.models, methods=["GET"]),
                                 Route("/health", self.health, methods=["GET"]),
                                 Route("/metrics", self.prometheus, methods=["GET"])], lifespan=lifespan)  # fmt: skip

    # the endpoints

    async def completions(self, request: Request) -> Response:
        return await self.handle(request, "/v1/completions", self.completion_ids)

    async def chat_completions(self, request: Request) -> Response:
        return await self.handle(request, "/v1/chat/completions", self.chat_ids)

    async def models(self, request: Request) -> Response:
        try:
            check_key(request, self.api_key)
            cards = await self.upstream_models()
        except Refused as err:
            return self.refused("/v1/models", err)
        except httpx.TransportError as err:
            return self.unreachable(err)
        card = {"id": self.name, "object": "model", "owned_by": "orchmoe", "root": self.base_name,
                "max_model_len": self.base_context(cards)}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card, *cards]})

    async def health(self, request: Request) -> Response:
        """200 when vLLM answers its /health; with the pid and restart count of a vLLM the front started."""
        managed = self.managed
        state = {"vllm": self.upstream} if managed is None or managed.process is None else \
            {"vllm": self.upstream, "pid": managed.process.pid, "restarts": managed.restarts}  # fmt: skip
        try:
            status = (await self.client.get("/health")).status_code
        except httpx.TransportError as err:
            return self.unreachable(err)
        return JSONResponse({**state, "status": status}, status_code=200 if status == 200 else 503)

    async def prometheus(self, request: Request) -> Response:
        """vLLM's metrics (when it answers), then the front's own."""
        try:
            upstream = await self.client.get("/metrics")
            text = upstream.content if upstream.status_code == 200 else b""
        except httpx.TransportError:
            text = b""
        return Response(self.metrics.render(text), media_type=CONTENT_TYPE)

    # one request

    async def handle(self, request: Request, path: str, prompt_ids: Callable[[dict], list[int]]) -> Response:
        try:
            release = self.admission.admit()
        except Refused as err:
            return self.refused(path, err)
        response: Response | None = None
        try:
            response = await self.serve_one(request, path, prompt_ids, release)
            return response
        except Refused as err:
            return self.refused(path, err)
        except ClientDisconnect:
            log.info("%s: the client went away before its request arrived", path)
            self.metrics.refusals.labels("client_disconnected").inc()
            return Response(status_code=400)
        finally:
            if not isinstance(response, StreamingResponse):  # a stream counts out when it ends
                release()

    async def serve_one(self, request: Request, path: str, prompt_ids: Callable[[dict], list[int]],
                        release: Callable[[], None] = lambda: None) -> Response:  # fmt: skip
        """Check, route and forward one admitted request (``release`` counts it out: a stream's when it ends)."""
        check_key(request, self.api_key)
        raw = await read_body(request, self.max_body_bytes)
        body = parse(raw)
        model = body.get("model", self.name)
        try:
            route, ids, routing_ms = await self.resolve(model, body, prompt_ids, len(raw))
        except httpx.TransportError as err:
            return self.unreachable(err)
        if route != "none":
            body["model"] = route
        headers = {ROUTE_HEADER: route, ROUTING_MS_HEADER: f"{routing_ms:.3f}"}
        response = await self.forward(path, body, headers, release)
        self.metrics.requests.labels(path, route).inc()
        tokens = f"{len(ids)} prompt tokens, " if ids is not None else ""
        how = f"routed to {route}" if route != "none" else f"passed through to {model}"
        log.info("%s %s (%srouting %.2f ms) -> %d", path, how, tokens, routing_ms, response.status_code)
        return response

    def refused(self, path: str, err: Refused) -> Response:
        log.info("%s refused (%d, %s): %s", path, err.status, err.reason, err)
        self.metrics.refusals.labels(err.reason).inc()
        return error(err.status, str(err), err.code, err.headers)

    async def resolve(
        self, model: str, body: dict, prompt_ids: Callable[[dict], list[int]], size: int = 0
    ) -> tuple[str, list[int] | None, float]:
        """(the adapter or "none" for a pass-through, the routed prompt's ids, routing ms: tokenize + route). The
        prompt is tokenized and checked against the context before the Task Router reads it; both run in a worker
        thread of the lane its size asks for."""
        if not isinstance(model, str):
            raise Refused(400, "'model' must be a string")
        if model in (*self.adapters, self.base_name):
            return "none", None, 0.0
        if model != self.name:
            served = ", ".join([self.name, *self.adapters, self.base_name])
            raise Refused(404, f"unknown model {model!r}; this server serves: {served}", "model_not_found",
                          "unknown_model")  # fmt: skip
        started = time.perf_counter()
        lane = self.admission.long if size > LONG_BODY else self.admission.short
        ids = await lane.run(self.tokenize, prompt_ids, body)
        tokenized = time.perf_counter() - started
        await self.check_length(ids)  # may ask vLLM once: not part of the routing time
        started = time.perf_counter()
        route = await self.admission.lane(len(ids)).run(self.route, ids)
        seconds = tokenized + time.perf_counter() - started
        self.metrics.routing.observe(seconds)
        return route, ids, seconds * 1e3

    def tokenize(self, prompt_ids: Callable[[dict], list[int]], body: dict) -> list[int]:
        """``prompt_ids`` in a worker thread, one tokenizer call at a time (they share one tokenizer)."""
        with self.admission.tokenizer_lock:
            return prompt_ids(body)

    async def forward(self, path: str, body: dict, headers: dict[str, str],
                      release: Callable[[], None] = lambda: None) -> Response:  # fmt: skip
        try:
            upstream = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.TransportError as err:
            return self.unreachable(err, headers)
        headers = {**headers, "content-type": upstream.headers.get("content-type", "application/json")}
        if body.get("stream"):

            async def relay() -> AsyncIterator[bytes]:  # closed when the stream ends, fails or its client goes
                try:
                    async for chunk in upstream.aiter_bytes():
                        yield chunk
                finally:
                    await upstream.aclose()
                    release()

            async def close() -> None:  # after the response, if the relay never ran
                await upstream.aclose()
                release()

            return StreamingResponse(relay(), status_code=upstream.status_code, headers=headers,
                                     background=BackgroundTask(close))  # fmt: skip
        try:
            content = await upstream.aread()
        except httpx.TransportError as err:
            return self.unreachable(err, headers)
        finally:
            await upstream.aclose()
        return Response(content, status_code=upstream.status_code, headers=headers)

    def unreachable(self, err: Exception, headers: dict[str, str] | None = None) -> Response:
        message = (f"vLLM at {self.upstream} is not answering ({type(err).__name__}); the request was not served, "
                   "retry once it is back")  # fmt: skip
        log.warning("%s", message)
        self.metrics.refusals.labels("upstream_unavailable").inc()
        response = error(503, message, "service_unavailable")
        response.headers.update(headers or {})
        return response

    # routing

    def completion_ids(self, body: dict) -> list[int]:
        """The prompt's token ids as vLLM makes them: a string tokenized with the tokenizer's special tokens, or ids."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
            if len(prompt) > 1:
                message = (f"{len(prompt)} prompts in one request: the front routes one prompt per request; send "
                           "them separately, or name an adapter in 'model' to batch them")  # fmt: skip
                raise Refused(400, message)
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"] if prompt else []
        elif isinstance(prompt, list) and all(isinstance(p, int) for p in prompt):
            ids = prompt
        else:
            raise Refused(400, "'prompt' must be a string or a list of token ids")
        if not ids:
            raise Refused(400, "the prompt is empty: there is nothing to route")
        vocab = len(self.table.weight)
        if max(ids) >= vocab or min(ids) < 0:
            raise Refused(400, f"a token id of the prompt is outside the vocabulary (0..{vocab - 1})")
        return ids

    def chat_ids(self, body: dict) -> list[int]:
        """The chat's token ids as vLLM renders them: the chat template with the generation prompt, tokenized."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refused(400, "'messages' must be a non-empty list of chat messages")
        if self.tokenizer.chat_template is None and body.get("chat_template") is None:
            raise Refused(400, "the base model's tokenizer has no chat template: use /v1/completions")
        try:
            # what vLLM renders into the prompt: the tools and documents too, so that the route reads the same text
            options = {"chat_template": body.get("chat_template"), "tools": body.get("tools"),
                       "documents": body.get("documents"), **body.get("chat_template_kwargs", {}),
                       "add_generation_prompt": body.get("add_generation_prompt", True),
                       "continue_final_message": body.get("continue_final_message", False)}  # fmt: skip
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, **options)
        except Exception as err:  # the template's own errors (a missing role, ...) are the client's
            raise Refused(400, f"the chat template does not render these messages: {err}") from None
        ids = list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        if not ids:
            raise Refused(400, "the chat renders to an empty prompt: there is nothing to route")
        return ids

    async def upstream_models(self) -> list[dict]:
        """vLLM's model cards (none while it is not ready)."""
        response = await self.client.get("/v1/models")
        return response.json().get("data", []) if response.status_code == 200 else []

    def base_context(self, cards: list[dict]) -> int | None:
        """The base's max_model_len among vLLM's model cards, kept once known (for the length checks)."""
        if self.max_model_len is None:
            self.max_model_len = next((c.get("max_model_len") for c in cards if c.get("id") == self.base_name), None)
        return self.max_model_len

    async def context_length(self) -> int | None:
        """vLLM's max_model_len for the base (asked until known)."""
        if self.max_model_len is None:
            return self.base_context(await self.upstream_models())
        return self.max_model_len

    async def check_length(self, ids: list[int]) -> None:
        limit = await self.context_length()
        if limit is not None and len(ids) >= limit:
            raise Refused(400, f"the prompt has {len(ids)} tokens; the model's context is {limit} tokens, with room "
                          "for at least one generated token", reason="prompt_too_long")  # fmt: skip

    def route(self, ids: list[int]) -> str:
        """The adapter of the prompt's most likely abstract task."""
        input_ids = torch.tensor([ids])  # (1, L)
        return self.router.adapter_names(input_ids, torch.ones_like(input_ids), self.table)[0]
