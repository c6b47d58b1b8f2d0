"""The OpenAI-compatible path: huggingface_hub's client against a loopback chat server.

The server (stdlib ``http.server`` in a thread) answers ``POST /v1/chat/completions`` with a
real tiny transformers Llama: greedy text, and for ``logprobs`` requests the first token's
top log-probabilities from the model's own logits, as vLLM does.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from lightning_interp.autointerp.explainer import EndpointChatModel, LocalChatModel
from lightning_interp.autointerp.run import ExplainSettings, run_autointerp
from lightning_interp.features.layout import read_store
from tests.autointerp.planted import chat_model, chat_tokenizer, planted_store


def _handler(model, tokenizer, requests):
    local = LocalChatModel(model, tokenizer, batch_size=1)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output clean
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, body))
            if self.path != "/v1/chat/completions":
                self.send_error(404)
                return
            messages = body["messages"]
            choice = {"index": 0, "finish_reason": "stop", "logprobs": None}
            if body.get("logprobs"):
                ids = torch.tensor([local._prompt(messages)])
                with torch.no_grad():
                    logp = model(input_ids=ids).logits[0, -1].float().log_softmax(-1)
                top = logp.topk(min(body.get("top_logprobs") or 1, logp.numel()))
                entries = [
                    {"token": tokenizer.decode([i]), "logprob": v, "bytes": None}
                    for v, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
                ]
                text = entries[0]["token"]
                choice["logprobs"] = {"content": [{**entries[0], "top_logprobs": entries}]}
            else:
                text = local.generate([messages], body.get("max_tokens") or 16)[0]
            choice["message"] = {"role": "assistant", "content": text}
            payload = json.dumps(
                {"id": "x", "object": "chat.completion", "created": 0, "model": "tiny",
                 "system_fingerprint": "", "choices": [choice],
                 "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
            ).encode()  # fmt: skip
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    return Handler


@pytest.fixture(scope="module")
def server():
    model, tokenizer, requests = chat_model(), chat_tokenizer(), []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(model, tokenizer, requests))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", model, tokenizer, requests
    httpd.shutdown()
    thread.join()


def test_endpoint_answers_match_the_same_model_run_locally(server):
    url, model, tokenizer, requests = server
    remote = EndpointChatModel(url, model="tiny")
    local = LocalChatModel(model, tokenizer)
    chats = [[{"role": "user", "content": "w1 w2 " * n + "Yes or No"}] for n in (1, 3)]
    # 19 tokens fit in top_logprobs=20, so the client sees P(Yes) and P(No) exactly.
    assert remote.yes_probability(chats) == pytest.approx(local.yes_probability(chats), abs=1e-4)
    assert remote.generate(chats, 5) == local.generate(chats, 5)
    path, body = requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "tiny"
    assert body["messages"] == chats[-1] and body["temperature"] == 0.0


def test_run_through_the_endpoint(server, tmp_path):
    url, *_ = server
    folder = planted_store(tmp_path / "store")
    settings = ExplainSettings(n_explain=2, n_test=2, max_new_tokens=3, model=url)
    results = run_autointerp(
        folder, read_store(folder), EndpointChatModel(url), None, [0, 1], settings, 2, False
    )
    assert set(results["explanations"]) == {"0", "1"}
    assert results["summary"]["real"]["fuzz"]["latents"] == 2
