"""Drives the coordinator's OpenAI-compatible API with the official openai client and prints
what it got as one JSON object (the C++ test compares it with the gRPC API's answers).

usage: openai_client_check.py BASE_URL MODEL PROMPT MAX_TOKENS
"""
import json
import sys

import openai

base_url, model, prompt, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=60)
listed = client.models.list().data
out = {"models": [m.id for m in listed],
       # vLLM's extra field, which clients read to size requests
       "max_model_len": [getattr(m, "max_model_len", None) for m in listed],
       "created": [m.created for m in listed]}

messages = [{"role": "user", "content": prompt}]
chat = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                      temperature=0)
out["chat"] = {"content": chat.choices[0].message.content,
               "role": chat.choices[0].message.role,
               "finish_reason": chat.choices[0].finish_reason,
               "usage": chat.usage.model_dump()}

pieces, finish, usage, roles = [], None, None, []
for chunk in client.chat.completions.create(model=model, messages=messages,
                                            max_tokens=max_tokens, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage.model_dump()
    for choice in chunk.choices:
        if choice.delta.role:
            roles.append(choice.delta.role)
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out["chat_stream"] = {"content": "".join(pieces), "chunks": len(pieces), "roles": roles,
                      "finish_reason": finish, "usage": usage}

completion = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0)
out["completion"] = {"text": completion.choices[0].text,
                     "finish_reason": completion.choices[0].finish_reason,
                     "usage": completion.usage.model_dump()}
pieces = []
for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                       temperature=0, stream=True):
    for choice in chunk.choices:
        pieces.append(choice.text)
out["completion_stream"] = {"text": "".join(pieces)}

# Seeded sampling repeats.
seeded = [client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                    temperature=0.9, seed=7).choices[0].text for _ in range(2)]
out["seeded_equal"] = seeded[0] == seeded[1]
# vLLM's ignore_eos as its users send it through the official client (extra_body).
ignored = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
out["ignore_eos"] = {"finish_reason": ignored.choices[0].finish_reason,
                     "completion_tokens": ignored.usage.completion_tokens}

errors = {}
def expect_error(name, call):
    try:
        call()
        errors[name] = None
    except openai.APIStatusError as e:
        errors[name] = {"status": e.status_code, "body": e.body}
expect_error("unknown_model", lambda: client.completions.create(model="no-such-model",
                                                                prompt=prompt))
expect_error("n_2", lambda: client.completions.create(model=model, prompt=prompt, n=2))
expect_error("logprobs", lambda: client.chat.completions.create(model=model, messages=messages,
                                                                logprobs=True))
expect_error("tools", lambda: client.chat.completions.create(
    model=model, messages=messages,
    tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]))
expect_error("bad_role", lambda: client.chat.completions.create(
    model=model, messages=[{"role": "robot", "content": "x"}]))
expect_error("temperature", lambda: client.completions.create(model=model, prompt=prompt,
                                                              temperature=5))
# 100,000 stop strings: refused at once by the limit on stop strings, whatever it would cost.
expect_error("stop_100k", lambda: client.completions.create(
    model=model, prompt=prompt, stop=[f"s{i}" for i in range(100000)]))
out["errors"] = errors

# A batch through the Files and Batches endpoints: upload, create, poll, read both files.
import io
import time

lines = []
for i in range(7):
    body = {"model": model, "messages": [{"role": "user", "content": f"{prompt} {i}"}],
            "max_tokens": max_tokens, "temperature": 0}
    if i == 4:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    if i == 6:
        body["model"] = "no-such-model"
    lines.append(json.dumps({"custom_id": f"b{i}", "method": "POST",
                             "url": "/v1/chat/completions", "body": body}))
uploaded = client.files.create(file=("batch.jsonl", io.BytesIO("\n".join(lines).encode())),
                               purpose="batch")
batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                              completion_window="24h", metadata={"job": "check"})
deadline = time.time() + 60
while batch.status not in ("completed", "failed", "cancelled", "expired") and time.time() < deadline:
    time.sleep(0.2)
    batch = client.batches.retrieve(batch.id)
output = client.files.content(batch.output_file_id).text if batch.output_file_id else ""
errors_text = client.files.content(batch.error_file_id).text if batch.error_file_id else ""
out["batch"] = {
    "file_bytes": uploaded.bytes,
    "status": batch.status,
    "counts": batch.request_counts.model_dump(),
    "metadata": batch.metadata,
    "listed": batch.id in [b.id for b in client.batches.list().data],
    "errors": [e.model_dump() for e in (batch.errors.data if batch.errors else [])],
    "output": [json.loads(l) for l in output.splitlines() if l.strip()],
    "error_file": [json.loads(l) for l in errors_text.splitlines() if l.strip()],
    # The output file's object gives its size (it said 0).
    "output_file_bytes_match": (client.files.retrieve(batch.output_file_id).bytes
                                == len(output.encode()) if batch.output_file_id else None),
}
# The uploaded file is listed, and deleted: gone from the list, and retrieving it is a 404.
second = client.files.create(file=("more.jsonl", io.BytesIO(lines[0].encode())), purpose="batch")
listed = [f.id for f in client.files.list().data]
deleted = client.files.delete(uploaded.id)
try:
    client.files.retrieve(uploaded.id)
    retrieved_after_delete = None
except openai.APIStatusError as e:
    retrieved_after_delete = e.status_code
out["files"] = {
    "listed_newest_first": listed[:2] == [second.id, uploaded.id],
    "deleted": deleted.deleted and deleted.id == uploaded.id,
    "listed_after_delete": [f.id for f in client.files.list().data],
    "second": second.id,
    "retrieved_after_delete": retrieved_after_delete,
    # The batch made from the deleted file keeps its results.
    "batch_after_delete": client.batches.retrieve(batch.id).request_counts.model_dump(),
}
print(json.dumps(out))
