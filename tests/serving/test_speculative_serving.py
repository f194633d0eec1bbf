"""Speculative decoding behind the HTTP API, asked with the official openai client: the
streamed text equals the whole response (several tokens may arrive in one step), greedy
answers equal the plain server's, and /metrics carries the proposal counters and rates."""

from __future__ import annotations

import httpx
from http_fixtures import serve_local
from prometheus_client.parser import text_string_to_metric_families

NGRAM = {"method": "ngram", "num_speculative_tokens": 4}
PROMPTS = [
    "the cat sat on the mat, the cat sat on the mat, the cat sat on",
    "one two three four, one two three four, one two",
]


def answers(client) -> list[str]:
    texts = []
    for prompt in PROMPTS:
        whole = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0.0
        )
        stream = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=40, temperature=0.0, stream=True
        )
        streamed = "".join(chunk.choices[0].text for chunk in stream)
        assert streamed == whole.choices[0].text
        texts.append(whole.choices[0].text)
    return texts


def metric(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} not in /metrics")


def test_speculation_serves_the_plain_answers_and_counts_proposals(tiny_checkpoint):
    with serve_local(tiny_checkpoint) as plain, plain.openai() as client:
        want = answers(client)
    overrides = {"speculative_config": NGRAM}
    with serve_local(tiny_checkpoint, overrides) as served, served.openai() as client:
        assert answers(client) == want
        base = served.base_url
        proposed = metric(base, "ernie_spec_decode_num_draft_tokens_total")
        accepted = metric(base, "ernie_spec_decode_num_accepted_tokens_total")
        drafts = metric(base, "ernie_spec_decode_num_drafts_total")
        assert proposed > 0 and 0 < accepted <= proposed
        assert metric(base, "ernie_spec_decode_acceptance_rate") == accepted / proposed
        length = metric(base, "ernie_spec_decode_mean_accepted_length")
        assert length == 1 + accepted / drafts
