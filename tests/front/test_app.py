"""The routing front before a recording stand-in for vLLM's OpenAI server (the real vLLM: test_vllm.py): each request
reaches vLLM with ``model`` set to the adapter OrchMoE itself routes its prompt to; bad requests get a 4xx and never
reach vLLM; a vLLM that does not answer gives a 503 at once."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from orchmoe.front import free_port
from orchmoe.front.app import ROUTE_HEADER, Front, load_input_embeddings

from .conftest import CHAT_TEMPLATE, PROMPTS, Served, chat_ids, orchmoe_route

CONTEXT = 64  # the stand-in's max_model_len


class RecordingVLLM:
    """Answers as vLLM's OpenAI server does, in outline, and records every request body it receives."""

    def __init__(self, base_name: str) -> None:
        self.base_name, self.bodies, self.model_queries = base_name, [], 0

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        if body.get("stream"):
            chunks = [f"data: {json.dumps({'model': body['model'], 'choices': [{'text': t}]})}\n\n" for t in "abc"]
            return StreamingResponse(iter([*chunks, "data: [DONE]\n\n"]), media_type="text/event-stream")
        return JSONResponse({"model": body["model"], "choices": [{"index": 0, "text": "ok"}]})

    async def models(self, request: Request) -> Response:
        self.model_queries += 1
        return JSONResponse({"data": [{"id": self.base_name, "max_model_len": CONTEXT}]})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/completions", self.generate, methods=["POST"]),
                                 Route("/v1/chat/completions", self.generate, methods=["POST"]),
                                 Route("/v1/models", self.models), Route("/health", lambda r: Response()),
                                 Route("/metrics", lambda r: Response(VLLM_METRICS))])  # fmt: skip


VLLM_METRICS = b"# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0.0\n"


@pytest.fixture
def front(served: Served) -> Iterator[tuple[TestClient, RecordingVLLM, Front]]:
    app = Front(served.served, served.base, "http://vllm")
    vllm = RecordingVLLM(app.base_name)
    app.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=vllm.app()), base_url="http://vllm")
    with TestClient(app.app()) as client:
        yield client, vllm, app


def test_the_embedding_table_is_the_models(served: Served) -> None:
    table = load_input_embeddings(served.base)
    assert table.weight.equal(served.model.get_base_model().get_input_embeddings().weight)


def test_each_completion_goes_to_the_adapter_orchmoe_routes_its_prompt_to(front, served: Served) -> None:
    client, vllm, _ = front
    routes = []
    for i, prompt in enumerate(PROMPTS):
        body = {"model": "orchmoe", "prompt": prompt, "max_tokens": 3} if i % 2 else {"prompt": prompt}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        expected = orchmoe_route(served, served.tokenizer(prompt)["input_ids"])
        assert response.headers[ROUTE_HEADER] == expected
        assert vllm.bodies[-1] == {**body, "model": expected}  # the rest of the request unchanged
        routes.append(expected)
    assert len(set(routes)) >= 2  # the prompts cover several abstract tasks
    ids = served.tokenizer(PROMPTS[0])["input_ids"]
    by_ids = client.post("/v1/completions", json={"prompt": ids})  # token ids route as their text does
    assert by_ids.headers[ROUTE_HEADER] == routes[0]


def test_a_chat_routes_from_its_rendered_template(front, served: Served) -> None:
    client, vllm, _ = front
    routes = set()
    for prompt in PROMPTS:
        messages = [{"role": "user", "content": prompt}]
        response = client.post("/v1/chat/completions", json={"model": "orchmoe", "messages": messages})
        expected = orchmoe_route(served, chat_ids(served, messages))
        assert response.status_code == 200 and response.headers[ROUTE_HEADER] == expected
        assert vllm.bodies[-1]["model"] == expected and vllm.bodies[-1]["messages"] == messages
        routes.add(expected)
    assert len(routes) >= 2


def test_a_stream_is_relayed_with_its_route(front, served: Served) -> None:
    client, _, _ = front
    with client.stream("POST", "/v1/completions", json={"prompt": PROMPTS[1], "stream": True}) as response:
        text = "".join(response.iter_text())
    expected = orchmoe_route(served, served.tokenizer(PROMPTS[1])["input_ids"])
    assert response.status_code == 200 and response.headers[ROUTE_HEADER] == expected
    events = [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events] == ["a", "b", "c"] and text.endswith("data: [DONE]\n\n")


@pytest.mark.parametrize("model", ["abstract-task-1", "base"])
def test_a_named_adapter_or_the_base_passes_through_unrouted(front, model: str) -> None:
    client, vllm, _ = front
    name = vllm.base_name if model == "base" else model
    body = {"model": name, "prompt": ["two", "prompts"]}  # a batch is fine unrouted
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200 and response.headers[ROUTE_HEADER] == "none"
    assert vllm.bodies == [body]


BAD = [  # (endpoint, raw body, status, words of the message)
    ("/v1/completions", b'{"prompt": "unterminated', 400, "not valid JSON"),
    ("/v1/completions", b'["a", "list"]', 400, "JSON object"),
    ("/v1/completions", b'{"prompt": ""}', 400, "empty"),
    ("/v1/completions", b'{"prompt": []}', 400, "empty"),
    ("/v1/completions", b'{"max_tokens": 3}', 400, "string or a list of token ids"),
    ("/v1/completions", b'{"prompt": ["one", "two"]}', 400, "one prompt per request"),
    ("/v1/completions", b'{"prompt": [5, 100000]}', 400, "outside the vocabulary"),
    ("/v1/completions", json.dumps({"prompt": "x" * CONTEXT}).encode(), 400, "context is 64 tokens"),
    ("/v1/completions", b'{"model": "abstract-task-9", "prompt": "x"}', 404, "unknown model 'abstract-task-9'"),
    ("/v1/chat/completions", b'{"messages": []}', 400, "non-empty list"),
    ("/v1/chat/completions", b'{"messages": "hello"}', 400, "non-empty list"),
    ("/v1/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (
        "/v1/completions",
        b'{"prompt": "' + b"[" * 3 + b'", "x": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}",
        400,
        "nested too deeply",
    ),
    ("/v1/completions", b'{"prompt": "a lone \\ud800 surrogate"}', 400, "lone UTF-16 surrogate"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "surrogate"),
    ("/v1/completions", b'{"prompt": "x\xff"}', 400, "not valid JSON"),
    ("/v1/completions", b'{"model": 5, "prompt": "x"}', 400, "'model' must be a string"),
    ("/v1/completions", b'{"prompt": {"text": "x"}}', 400, "string or a list of token ids"),
    ("/v1/chat/completions", b'{"messages": [5]}', 400, "does not render"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": 5}',
        400,
        "does not render",
    ),
]


@pytest.mark.parametrize(("path", "raw", "status", "words"), BAD)
def test_bad_input_gets_a_clear_4xx_and_never_reaches_vllm(front, path: str, raw: bytes, status: int, words: str):
    client, vllm, _ = front
    response = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status and words in response.json()["error"]["message"]
    assert vllm.bodies == []
    assert client.post("/v1/completions", json={"prompt": "still serving"}).status_code == 200


def test_a_chat_the_template_cannot_render_is_refused(front) -> None:
    client, vllm, app = front
    messages = [{"role": "user", "content": "hi"}]
    response = client.post("/v1/chat/completions", json={"messages": messages, "chat_template": "{{ x.y() }}"})
    assert response.status_code == 400 and "does not render" in response.json()["error"]["message"]
    app.tokenizer.chat_template = None
    response = client.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 400 and "no chat template" in response.json()["error"]["message"]
    assert vllm.bodies == []


def test_the_model_list_names_orchmoe_and_its_context_once_asked(front) -> None:
    client, vllm, app = front
    listed = client.get("/v1/models").json()["data"]
    assert listed[0] == {"id": app.name, "object": "model", "owned_by": "orchmoe", "root": vllm.base_name,
                         "max_model_len": CONTEXT}  # fmt: skip
    assert [c["id"] for c in listed[1:]] == [vllm.base_name]  # vLLM's own cards follow
    response = client.post("/v1/completions", json={"prompt": "x" * CONTEXT})
    assert response.status_code == 400 and "context is 64 tokens" in response.json()["error"]["message"]
    assert vllm.model_queries == 1  # the length check reused the context the listing read


def test_a_vllm_that_does_not_answer_gives_503_at_once(served: Served) -> None:
    app = Front(served.served, served.base, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with TestClient(app.app()) as client:
        requests = [("/v1/completions", {"prompt": "hi"}),
                    ("/v1/completions", {"model": "abstract-task-0", "prompt": "hi"}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})]  # fmt: skip
        for path, body in requests:
            response = client.post(path, json=body)
            assert response.status_code == 503 and "not answering" in response.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        assert client.get("/v1/models").status_code == 503


TOOL_TEMPLATE = "{% if tools %}tools: {{ tools | length }}\n{% endif %}" + CHAT_TEMPLATE


def test_a_chat_routes_from_what_vllm_renders_tools_included(front, served: Served) -> None:
    client, _, app = front
    messages = [{"role": "user", "content": PROMPTS[0]}]
    tools = [{"type": "function", "function": {"name": f"f{i}", "parameters": {}}} for i in range(3)]
    body = {"messages": messages, "tools": tools, "chat_template": TOOL_TEMPLATE}
    rendered = served.tokenizer.apply_chat_template(messages, tools=tools, chat_template=TOOL_TEMPLATE,
                                                    add_generation_prompt=True, tokenize=True)  # fmt: skip
    ids = list(rendered["input_ids"] if hasattr(rendered, "keys") else rendered)
    assert ids != chat_ids(served, messages)  # the tools change the prompt
    assert app.chat_ids(body) == ids  # the front routes what vLLM renders
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers[ROUTE_HEADER] == orchmoe_route(served, ids)
