"""Azure OpenAI's path layout: /openai/deployments/{deployment}/{tail} and /openai/v1/{tail}.
`AzureOpenAI(azure_endpoint=<tollgate>)` clients send these; Tollgate meters them like /v1
and sends each on in the layout its routed upstream speaks. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from proxy.exchange import Endpoint, Exchange

# The model endpoints an Azure deployment serves, as the tail after /deployments/{name}/.
AZURE_DEPLOYMENT_ENDPOINTS: dict[str, Endpoint] = {
    "chat/completions": "chat.completions",
    "completions": "completions",
    "embeddings": "embeddings",
}


@dataclass(frozen=True, slots=True)
class AzureTarget:
    """A request in Azure OpenAI's path layout: /openai/deployments/{deployment}/{tail} or
    /openai/v1/{tail}, with the client's query (api-version)."""

    deployment: str | None  # None: the v1 layout, where the body names the model
    tail: str  # "chat/completions", "completions", "embeddings", "responses"
    query: str

    def upstream_request(self, ex: Exchange, kind: str, payload: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The path (after the upstream's API base) and body for the routed upstream."""
        if kind == "azure":
            query = f"?{self.query}" if self.query else ""
            if self.deployment is None:
                return f"/v1/{self.tail}{query}", payload
            # An alias route sends the request to the deployment it names.
            deployment = ex.upstream_model or self.deployment
            return f"/deployments/{quote(deployment, safe='')}/{self.tail}{query}", payload
        # An OpenAI-layout upstream: its own path, the model in the body, no api-version.
        if "model" not in payload:
            payload = {**payload, "model": ex.upstream_model or ex.requested_model}
        return "/" + self.tail, payload
