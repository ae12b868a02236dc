"""Drives a kvroute agent with the official `openai` client: completions and chat, plain and
streamed, greedy. Prints one JSON object with what came back, for the Rust test to check.

usage: openai_roundtrip.py BASE_URL MODEL PROMPT MAX_TOKENS
"""
import json
import sys

import openai

base_url, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
out = {"openai_version": openai.__version__}

models = client.models.list()
out["models"] = [m.id for m in models.data]

c = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
out["completion"] = {
    "text": c.choices[0].text,
    "finish_reason": c.choices[0].finish_reason,
    "prompt_tokens": c.usage.prompt_tokens,
    "completion_tokens": c.usage.completion_tokens,
}

text, finish, usage = "", None, None
for chunk in client.completions.create(
    model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
out["completion_stream"] = {"text": text, "finish_reason": finish, "completion_tokens": usage}

messages = [{"role": "user", "content": prompt}]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
out["chat"] = {
    "text": r.choices[0].message.content,
    "role": r.choices[0].message.role,
    "finish_reason": r.choices[0].finish_reason,
    "completion_tokens": r.usage.completion_tokens,
}

text, finish, role, usage = "", None, None, None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices:
        d = chunk.choices[0].delta
        role = d.role or role
        text += d.content or ""
        finish = chunk.choices[0].finish_reason or finish
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
out["chat_stream"] = {"text": text, "role": role, "finish_reason": finish, "completion_tokens": usage}

# An error the client must surface as an exception with the status and body.
try:
    client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
    out["bad_model"] = None
except openai.NotFoundError as e:
    out["bad_model"] = {"status": e.status_code, "code": e.code, "param": e.param}

json.dump(out, sys.stdout)
