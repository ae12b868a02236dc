"""Asks a kvroute agent (or gateway) for log-probabilities and penalties with the official
`openai` client: completions and chat, plain and streamed, greedy. Prints one JSON object with
what came back, for the Rust test to check.

usage: openai_logprobs.py BASE_URL MODEL PROMPT MAX_TOKENS
"""
import json
import sys

import openai

base_url, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
out = {}

c = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                              logprobs=3)
lp = c.choices[0].logprobs
out["completion"] = {
    "text": c.choices[0].text,
    "tokens": lp.tokens,
    "token_logprobs": lp.token_logprobs,
    "top_logprobs": lp.top_logprobs,
    "text_offset": lp.text_offset,
}

tokens, token_logprobs, text = [], [], ""
for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, logprobs=3, stream=True):
    ch = chunk.choices[0]
    text += ch.text
    if ch.logprobs is not None:
        tokens += ch.logprobs.tokens
        token_logprobs += ch.logprobs.token_logprobs
out["completion_stream"] = {"text": text, "tokens": tokens, "token_logprobs": token_logprobs}

messages = [{"role": "user", "content": prompt}]
c = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                   temperature=0, logprobs=True, top_logprobs=2)
content = c.choices[0].logprobs.content
out["chat"] = {
    "text": c.choices[0].message.content,
    "tokens": [t.token for t in content],
    "logprobs": [t.logprob for t in content],
    "top": [[a.token for a in t.top_logprobs] for t in content],
    "bytes_ok": all(bytes(t.bytes) == t.token.encode() for t in content),
}

text, n = "", 0
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                            temperature=0, logprobs=True, stream=True):
    if not chunk.choices:
        continue
    ch = chunk.choices[0]
    text += ch.delta.content or ""
    if ch.logprobs is not None and ch.logprobs.content:
        n += len(ch.logprobs.content)
out["chat_stream"] = {"text": text, "logprob_tokens": n}

# Penalties: a greedy request that repeats itself, with and without strong penalties.
loop = "la la la la la la la la la la la la"
plain = client.completions.create(model=model, prompt=loop, max_tokens=max_tokens,
                                  temperature=0)
penalized = client.completions.create(model=model, prompt=loop, max_tokens=max_tokens,
                                      temperature=0, frequency_penalty=2.0, presence_penalty=2.0)
out["penalties"] = {"plain": plain.choices[0].text, "penalized": penalized.choices[0].text}

e = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0, echo=True)
out["echo"] = e.choices[0].text
out["echo_stream"] = "".join(
    ch.choices[0].text
    for ch in client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                        echo=True, stream=True)
    if ch.choices
)
out["no_echo"] = client.completions.create(model=model, prompt=prompt, max_tokens=4,
                                           temperature=0).choices[0].text

try:
    client.completions.create(model=model, prompt=prompt, max_tokens=2, presence_penalty=3)
    out["bad_penalty"] = None
except openai.BadRequestError as e:
    out["bad_penalty"] = e.body.get("param") if isinstance(e.body, dict) else str(e)

print(json.dumps(out))
