"""Ask a served model a question through the OpenAI-compatible API (standard library only).

    python serving/client.py --port 8000 "What is the capital of France?"

The same request with the official ``openai`` package (installed with vLLM)::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                           max_tokens=64, temperature=0)
    print(reply.choices[0].message.content)
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from typing import Any

__all__ = ["chat", "complete", "first_model", "post"]


def post(base_url: str, route: str, payload: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/{route.lstrip('/')}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", "Authorization": "Bearer unused"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def first_model(base_url: str, timeout: float = 30.0) -> str:
    """Name of the (first) served model, as clients must send it."""
    with urllib.request.urlopen(f"{base_url.rstrip('/')}/models", timeout=timeout) as response:
        return json.loads(response.read())["data"][0]["id"]


def chat(base_url: str, question: str, *, model: str | None = None, max_tokens: int = 64, **extra: Any) -> str:
    """Greedy chat completion (the server applies the model's chat template)."""
    payload = {
        "model": model or first_model(base_url),
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    return post(base_url, "chat/completions", payload)["choices"][0]["message"]["content"]


def complete(base_url: str, prompt: str | list[int], *, model: str | None = None, max_tokens: int = 32, **extra: Any):
    """Greedy text completion; ``prompt`` may be token ids. Returns the full response dict."""
    payload = {
        "model": model or first_model(base_url),
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }
    return post(base_url, "completions", payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ask a vLLM (OpenAI-compatible) server one question.")
    parser.add_argument("question")
    parser.add_argument("--base-url", default=None, help="Default: http://127.0.0.1:PORT/v1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    base_url = args.base_url or f"http://127.0.0.1:{args.port}/v1"
    print(chat(base_url, args.question, max_tokens=args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())
