"""The HTTP ingress is torch-free: importing it, starting it from a Serve config, and serving
chat and completions requests through it load neither torch nor xgrammar nor transformers (each ingress replica would
otherwise hold the whole engine's libraries).

Each case runs in a fresh interpreter: this test process has long since imported torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "xgrammar", "transformers")
INGRESS_MODULES = (
    "ernie_cluster",
    "ernie_cluster.serving.http_app",
    "ernie_cluster.serving.ray_serve.ingress",
)
TIMEOUT_S = 180

IMPORT_ONLY = """
import importlib, json, sys
for name in sys.argv[1].split(","):
    importlib.import_module(name)
print(json.dumps(sorted(m for m in sys.argv[2].split(",") if m in sys.modules)))
"""

SERVE_REQUESTS = """
import asyncio, json, sys

import httpx
import openai

from ernie_cluster.outputs import CompletionOutput, RequestOutput
from ernie_cluster.serving.api import OpenAIServing
from ernie_cluster.serving.http_app import build_http_app
from ernie_cluster.serving.ray_serve.config import ServeAppConfig
from ernie_cluster.serving.ray_serve.ingress import ingress_settings

ANSWER = "hello world"


class OneAnswer:
    # EngineClient double: every sample answers ANSWER, one token per output, then stops.
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = tokenizer.encode(ANSWER)

    async def generate(self, request, session_key=None):
        for position, token in enumerate(self.ids):
            last = position == len(self.ids) - 1
            yield RequestOutput(
                request_id=request.request_id,
                prompt=None,
                prompt_token_ids=list(request.prompt_token_ids),
                outputs=[
                    CompletionOutput(
                        index=i,
                        text=self.tokenizer.decode([token]),
                        token_ids=[token],
                        finish_reason="stop" if last else None,
                    )
                    for i in range(request.params.n)
                ],
                finished=last,
            )

    async def generate_batch(self, requests, session_key=None):
        for index, request in enumerate(requests):
            async for output in self.generate(request, session_key):
                yield index, output

    async def check_health(self):
        pass

    async def get_stats(self):
        return []


async def main(checkpoint):
    # What an ingress replica does at start: settings from the Serve config, no weights.
    config = ServeAppConfig(model=checkpoint, served_model_name=["tiny"], max_model_len=512)
    settings = ingress_settings(config, checkpoint)
    app = build_http_app(OpenAIServing(OneAnswer(settings.tokenizer), settings))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport) as http:
        client = openai.AsyncOpenAI(
            base_url="http://ingress.test/v1", api_key="unused", http_client=http
        )
        chat = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=64
        )
        stream = await client.completions.create(
            model="tiny", prompt="say hello", max_tokens=64, stream=True
        )
        completion = "".join([chunk.choices[0].text async for chunk in stream])
    return chat.choices[0].message.content, completion


chat, completion = asyncio.run(main(sys.argv[1]))
loaded = sorted(m for m in sys.argv[2].split(",") if m in sys.modules)
print(json.dumps({"answer": ANSWER, "chat": chat, "completion": completion, "loaded": loaded}))
"""


def run_fresh(script: str, *args: str) -> str:
    """Run `script` in a new interpreter; its last stdout line."""
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


def test_importing_the_ingress_loads_no_torch_xgrammar_or_transformers():
    loaded = json.loads(run_fresh(IMPORT_ONLY, ",".join(INGRESS_MODULES), ",".join(HEAVY)))
    assert loaded == [], f"importing the ingress loaded {loaded}"


def test_the_check_sees_a_module_that_loads_torch():
    """The same check on the in-process server (which runs the engine) reports torch."""
    modules = "ernie_cluster.serving.local_server"
    loaded = json.loads(run_fresh(IMPORT_ONLY, modules, ",".join(HEAVY)))
    assert "torch" in loaded


def test_serving_chat_and_completions_loads_no_torch_xgrammar_or_transformers(tiny_checkpoint):
    result = json.loads(run_fresh(SERVE_REQUESTS, str(tiny_checkpoint), ",".join(HEAVY)))
    assert result["chat"] == result["answer"]
    assert result["completion"] == result["answer"]
    assert result["loaded"] == [], f"serving through the ingress loaded {result['loaded']}"
