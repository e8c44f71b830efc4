"""What the accuracy tools run on: a local model (through ``LLM``) or an OpenAI-compatible
endpoint. Both score prompt tokens (for perplexity) and complete prompts (for HumanEval)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from soarllm.errors import InvalidRequestError


class Backend(Protocol):
    name: str

    def tokenizer(self) -> Any: ...

    def score(self, windows: list[list[int]]) -> list[list[float | None]]:
        """For each window of token ids: the logprob of every token given the ones before it
        (None for the first token)."""
        ...

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str],
                 temperature: float = 0.0) -> list[str]: ...


class LocalBackend:
    """A model loaded in this process through the offline API."""

    def __init__(self, model: str, **engine_args: Any):
        from soarllm import LLM

        self.name = model
        self.llm = LLM(model=model, **engine_args)

    def tokenizer(self) -> Any:
        return self.llm.get_tokenizer()

    def score(self, windows: list[list[int]]) -> list[list[float | None]]:
        from soarllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(windows, params)
        scored = []
        for ids, out in zip(windows, outputs):
            plp = out.prompt_logprobs or []
            row: list[float | None] = [None]
            for pos in range(1, len(ids)):
                entry = plp[pos] if pos < len(plp) else None
                row.append(entry[ids[pos]].logprob if entry and ids[pos] in entry else None)
            scored.append(row)
        return scored

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str],
                 temperature: float = 0.0) -> list[str]:
        from soarllm import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, stop=stop)
        return [o.outputs[0].text for o in self.llm.generate(prompts, params, use_tqdm=True)]


@dataclass
class EndpointBackend:
    """An OpenAI-compatible server. Scoring needs ``echo`` with ``logprobs`` on /v1/completions
    (the legacy format: ``choices[0].logprobs.token_logprobs`` over prompt and completion)."""

    url: str
    model: str | None = None
    tokenizer_name: str | None = None
    api_key: str | None = None
    concurrency: int = 4
    timeout_s: float = 600.0
    name: str = ""
    _tokenizer: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1")
        self.name = self.name or self.url

    def _client(self) -> Any:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(timeout=self.timeout_s, headers=headers)

    def _model(self, client: Any) -> str:
        if not self.model:
            response = client.get(f"{self.url}/v1/models")
            response.raise_for_status()
            self.model = str(response.json()["data"][0]["id"])
        return self.model

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from soarllm.bench.tokenizer import load_tokenizer

            name = self.tokenizer_name
            if name is None:
                with self._client() as client:
                    name = self._model(client)
            self._tokenizer = load_tokenizer(name)
        return self._tokenizer

    def _post(self, client: Any, body: dict[str, Any]) -> dict[str, Any]:
        response = client.post(f"{self.url}/v1/completions", json=body)
        if response.status_code != 200:
            raise InvalidRequestError(
                f"{self.url} answered {response.status_code}: {response.text[:300]}"
            )
        return response.json()

    def score(self, windows: list[list[int]]) -> list[list[float | None]]:
        with self._client() as client:
            model = self._model(client)

            def one(ids: list[int]) -> list[float | None]:
                body = {"model": model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                        "echo": True, "logprobs": 0}
                choice = self._post(client, body)["choices"][0]
                lps = (choice.get("logprobs") or {}).get("token_logprobs")
                if not lps or len(lps) < len(ids):
                    raise InvalidRequestError(
                        f"{self.url} returned no prompt logprobs (echo + logprobs); "
                        "perplexity needs a server that scores prompt tokens"
                    )
                return [None, *lps[1 : len(ids)]]

            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(one, windows))

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str],
                 temperature: float = 0.0) -> list[str]:
        with self._client() as client:
            model = self._model(client)

            def one(prompt: str) -> str:
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                        "temperature": temperature, "stop": stop[:4]}
                return str(self._post(client, body)["choices"][0]["text"])

            with ThreadPoolExecutor(self.concurrency) as pool:
                return list(pool.map(one, prompts))
