"""Streams a long completion through the gateway with the official `openai` client, says which
agent serves it after the third chunk and waits for a line on stdin (the test kills that agent
meanwhile), then reads the rest of the stream: it must end (with an error), never hang. Then
sends one more request. Prints one JSON object per step, for the Rust test to check.

usage: stream_through_kill.py BASE_URL MODEL
"""
import json
import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)

raw = client.completions.with_raw_response.create(
    model=model, prompt="Once upon a time", max_tokens=1000, temperature=0, stream=True,
    extra_body={"ignore_eos": True},
)
agent = raw.headers.get("x-kvroute-agent")
n = 0
out = {}
try:
    for chunk in raw.parse():
        n += 1
        if n == 3:
            print(json.dumps({"streaming_from": agent}), flush=True)
            sys.stdin.readline()
    out["stream"] = {"ended_without_error": True, "chunks": n}
except openai.APIError as e:
    out["stream"] = {"error": type(e).__name__, "message": e.message, "chunks": n}

raw = client.completions.with_raw_response.create(
    model=model, prompt="The capital of France is", max_tokens=8, temperature=0,
    extra_body={"ignore_eos": True},
)
c = raw.parse()
out["next"] = {
    "status": raw.status_code,
    "agent": raw.headers.get("x-kvroute-agent"),
    "text": c.choices[0].text,
    "completion_tokens": c.usage.completion_tokens,
}
print(json.dumps(out), flush=True)
