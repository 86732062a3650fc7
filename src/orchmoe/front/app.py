"""The routing front: an OpenAI-compatible server on loopback that sends each request to the abstract-task adapter
its prompt routes to, on a vLLM server that has every adapter registered.

A request for the routed model (``"model"`` is the front's name, ``orchmoe`` unless set, or absent) is routed: its
prompt is tokenized as vLLM tokenizes it (the chat template for chat completions), the Task Router reads the prompt's
input embeddings (no layer of the model runs) and the request goes to vLLM with ``"model"`` set to the adapter of the
most likely abstract task. A request naming an adapter or the base passes through unchanged. Streams are relayed as
they come. The route is in the ``X-OrchMoE-Route`` response header (``none`` for a pass-through) and in the log.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors import safe_open
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from transformers import AutoConfig, AutoTokenizer

from ..serving import PromptRouter
from .vllm import ManagedVLLM

log = logging.getLogger("orchmoe.front")
ROUTE_HEADER, ROUTING_MS_HEADER = "X-OrchMoE-Route", "X-OrchMoE-Routing-Ms"


class BadRequest(Exception):
    """A request the front refuses: ``status`` (4xx) and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.code = status, code


def error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": status}}, status_code=status)


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
                 base_name: str | None = None, timeout: float = 300,
                 managed: ManagedVLLM | None = None) -> None:  # fmt: skip
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
                                 Route("/health", self.health, methods=["GET"])], lifespan=lifespan)  # fmt: skip

    # the endpoints

    async def completions(self, request: Request) -> Response:
        return await self.handle(request, "/v1/completions", self.completion_ids)

    async def chat_completions(self, request: Request) -> Response:
        return await self.handle(request, "/v1/chat/completions", self.chat_ids)

    async def models(self, request: Request) -> Response:
        try:
            cards = await self.upstream_models()
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

    # one request

    async def handle(self, request: Request, path: str, prompt_ids: Callable[[dict], list[int]]) -> Response:
        try:
            body = self.parse(await request.body())
            model = body.get("model", self.name)
            route, ids, routing_ms = await self.resolve(model, body, prompt_ids)
        except BadRequest as err:
            log.info("%s refused (%d): %s", path, err.status, err)
            return error(err.status, str(err), err.code)
        except httpx.TransportError as err:
            return self.unreachable(err)
        if route != "none":
            body["model"] = route
        headers = {ROUTE_HEADER: route, ROUTING_MS_HEADER: f"{routing_ms:.3f}"}
        response = await self.forward(path, body, headers)
        tokens = f"{len(ids)} prompt tokens, " if ids is not None else ""
        how = f"routed to {route}" if route != "none" else f"passed through to {model}"
        log.info("%s %s (%srouting %.2f ms) -> %d", path, how, tokens, routing_ms, response.status_code)
        return response

    async def resolve(
        self, model: str, body: dict, prompt_ids: Callable[[dict], list[int]]
    ) -> tuple[str, list[int] | None, float]:
        """(the adapter or "none" for a pass-through, the routed prompt's ids, routing ms: tokenize + route)."""
        if model in (*self.adapters, self.base_name):
            return "none", None, 0.0
        if model != self.name:
            served = ", ".join([self.name, *self.adapters, self.base_name])
            raise BadRequest(404, f"unknown model {model!r}; this server serves: {served}", "model_not_found")
        started = time.perf_counter()
        ids = prompt_ids(body)
        route = self.route(ids)
        routing_ms = (time.perf_counter() - started) * 1e3
        await self.check_length(ids)  # may ask vLLM once: not part of the routing time
        return route, ids, routing_ms

    async def forward(self, path: str, body: dict, headers: dict[str, str]) -> Response:
        try:
            upstream = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.TransportError as err:
            return self.unreachable(err, headers)
        headers = {**headers, "content-type": upstream.headers.get("content-type", "application/json")}
        if body.get("stream"):
            return StreamingResponse(upstream.aiter_bytes(), status_code=upstream.status_code, headers=headers,
                                     background=BackgroundTask(upstream.aclose))  # fmt: skip
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
        response = error(503, message, "service_unavailable")
        response.headers.update(headers or {})
        return response

    # routing

    @staticmethod
    def parse(raw: bytes) -> dict:
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadRequest(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(body, dict):
            raise BadRequest(400, "the request body must be a JSON object")
        return body

    def completion_ids(self, body: dict) -> list[int]:
        """The prompt's token ids as vLLM makes them: a string tokenized with the tokenizer's special tokens, or ids."""
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(p, int) for p in prompt):
            if len(prompt) > 1:
                message = (f"{len(prompt)} prompts in one request: the front routes one prompt per request; send "
                           "them separately, or name an adapter in 'model' to batch them")  # fmt: skip
                raise BadRequest(400, message)
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"] if prompt else []
        elif isinstance(prompt, list) and all(isinstance(p, int) for p in prompt):
            ids = prompt
        else:
            raise BadRequest(400, "'prompt' must be a string or a list of token ids")
        if not ids:
            raise BadRequest(400, "the prompt is empty: there is nothing to route")
        vocab = len(self.table.weight)
        if max(ids) >= vocab or min(ids) < 0:
            raise BadRequest(400, f"a token id of the prompt is outside the vocabulary (0..{vocab - 1})")
        return ids

    def chat_ids(self, body: dict) -> list[int]:
        """The chat's token ids as vLLM renders them: the chat template with the generation prompt, tokenized."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest(400, "'messages' must be a non-empty list of chat messages")
        if self.tokenizer.chat_template is None and body.get("chat_template") is None:
            raise BadRequest(400, "the base model's tokenizer has no chat template: use /v1/completions")
        try:
            # what vLLM renders into the prompt: the tools and documents too, so that the route reads the same text
            options = {"chat_template": body.get("chat_template"), "tools": body.get("tools"),
                       "documents": body.get("documents"), **body.get("chat_template_kwargs", {}),
                       "add_generation_prompt": body.get("add_generation_prompt", True),
                       "continue_final_message": body.get("continue_final_message", False)}  # fmt: skip
            ids = self.tokenizer.apply_chat_template(messages, tokenize=True, **options)
        except Exception as err:  # the template's own errors (a missing role, ...) are the client's
            raise BadRequest(400, f"the chat template does not render these messages: {err}") from None
        ids = list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        if not ids:
            raise BadRequest(400, "the chat renders to an empty prompt: there is nothing to route")
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
            raise BadRequest(400, f"the prompt has {len(ids)} tokens; the model's context is {limit} tokens, with "
                             "room for at least one generated token")  # fmt: skip

    def route(self, ids: list[int]) -> str:
        """The adapter of the prompt's most likely abstract task."""
        input_ids = torch.tensor([ids])  # (1, L)
        return self.router.adapter_names(input_ids, torch.ones_like(input_ids), self.table)[0]
