"""Test helpers: a minimal OpenAI-compatible server over a local `transformers` model.

Serves `/v1/completions` (echo + logprobs, as vLLM does) and `/v1/chat/completions` (top_logprobs)
on 127.0.0.1 with an ephemeral port. Each prompt is run alone (no padding), unlike the batched
local backend, so agreement between the two also checks the padding logic.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch


class StubServer:
    def __init__(self, model, tokenizer):
        self.model, self.tok = model.eval(), tokenizer
        self.lock = threading.Lock()  # one forward at a time
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/v1/completions":
                    out = stub.completions(body)
                elif self.path == "/v1/chat/completions":
                    out = stub.chat(body)
                else:
                    self.send_error(404)
                    return
                data = json.dumps(out).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def _logprobs(self, ids: list[int]) -> torch.Tensor:  # (T, V) log-probs of the next token
        with self.lock, torch.no_grad():
            return torch.log_softmax(self.model(input_ids=torch.tensor([ids])).logits[0].float(), -1)

    def completions(self, body):
        assert body["echo"] and body["max_tokens"] == 0, "the stub only serves echo scoring"
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        choices = []
        for i, p in enumerate(prompts):
            ids = self.tok.encode(p, add_special_tokens=False)
            lp = self._logprobs(ids)
            token_lps = [None] + [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]
            choices.append(
                {
                    "index": i,
                    "text": p,
                    "logprobs": {"tokens": [self.tok.decode([t]) for t in ids], "token_logprobs": token_lps},
                }
            )
        return {"object": "text_completion", "choices": choices}

    def chat(self, body):
        ids = self.tok.apply_chat_template(body["messages"], tokenize=True, add_generation_prompt=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        lp = self._logprobs(list(ids))[-1]
        top = torch.topk(lp, body["top_logprobs"])
        entries = [
            {"token": self.tok.decode([int(t)]), "logprob": float(v)} for v, t in zip(top.values, top.indices)
        ]
        return {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": entries[0]["token"]},
                    "logprobs": {"content": [{**entries[0], "top_logprobs": entries}]},
                }
            ]
        }


@pytest.fixture
def stub_server():
    """The StubServer class: `with stub_server(model, tokenizer) as srv: srv.url`."""
    return StubServer
