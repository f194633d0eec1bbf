"""OpenAIServing: everything behind the OpenAI routes, independent of the web framework and
of where the engine runs (in-process, or Ray Serve replicas behind a handle)."""

from __future__ import annotations

import time

from ernie_cluster.serving.chat import ChatHandler
from ernie_cluster.serving.completions import CompletionHandler
from ernie_cluster.serving.engine_client import EngineClient
from ernie_cluster.serving.errors import NotFoundError
from ernie_cluster.serving.metrics import ServingMetrics
from ernie_cluster.serving.protocol import ModelCard, ModelList
from ernie_cluster.serving.settings import ServingSettings
from ernie_cluster.serving.tokenize_api import TokenizeHandler


class OpenAIServing:
    def __init__(self, client: EngineClient, settings: ServingSettings) -> None:
        self.client = client
        self.settings = settings
        self.metrics = ServingMetrics()
        self.chat = ChatHandler(client, settings, self.metrics)
        self.completions = CompletionHandler(client, settings, self.metrics)
        self.tokenizer_routes = TokenizeHandler(settings)
        self.created = int(time.time())
        """When this server started: every model card says the same (OpenAI's `created`)."""

    def check_model(self, name: str) -> None:
        if name not in self.settings.served_model_names:
            raise NotFoundError(
                f"the model {name!r} does not exist; this server serves "
                f"{self.settings.served_model_names}",
                param="model",
                code="model_not_found",
            )

    def served_model(self, name: str | None) -> str:
        """`name` when this server serves it (404 otherwise); None: the first served name."""
        if name is None:
            return self.settings.served_model_names[0]
        self.check_model(name)
        return name

    def models(self) -> ModelList:
        return ModelList(data=[self.model(name) for name in self.settings.served_model_names])

    def model(self, name: str) -> ModelCard:
        """The card of one served model (404 for any other name)."""
        self.check_model(name)
        return ModelCard(
            id=name,
            created=self.created,
            root=self.settings.model_name,
            max_model_len=self.settings.max_model_len,
        )

    async def render_metrics(self) -> bytes:
        try:
            stats = await self.client.get_stats()
        except Exception:  # an unhealthy engine still lets the request metrics be scraped
            stats = []
        return self.metrics.render(stats)
