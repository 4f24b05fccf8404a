"""Drives `didgate proxy` with the official OpenAI Python SDK (tests/tests/sdk_openai.rs).

Usage: openai_calls.py PLAN_JSON, with OPENAI_BASE_URL (the proxy URL and the upstream, e.g.
http://127.0.0.1:PORT/chat/v1) and OPENAI_API_KEY (the proxy token) in the environment.

PLAN_JSON: {"max_retries": N, "calls": [{"api": "chat" | "embeddings", "model": M}, ...]}.
The calls run one after the other with the SDK's own retry logic. Every HTTP attempt the SDK
makes is seen by httpx event hooks, so the output counts attempts exactly (no timing).

Prints one JSON line: {"calls": [{"attempts": A, "responses": [{"status", "x-should-retry",
"retry-after", "retry-after-ms", "didgate-call"}...], "ok": bool, "content": text or null,
"error": {"type", "status", "code", "message"} or null}, ...]}.
"""

import json
import sys

import openai

HEADERS = ("x-should-retry", "retry-after", "retry-after-ms", "didgate-call")


def main() -> None:
    plan = json.loads(sys.argv[1])
    current = {"attempts": 0, "responses": []}

    def on_request(request):
        current["attempts"] += 1

    def on_response(response):
        seen = {"status": response.status_code}
        for name in HEADERS:
            seen[name] = response.headers.get(name)
        current["responses"].append(seen)

    http_client = openai.DefaultHttpxClient(
        # only the proxy on loopback: no HTTP(S)_PROXY from the environment
        trust_env=False,
        event_hooks={"request": [on_request], "response": [on_response]},
    )
    client = openai.OpenAI(
        max_retries=plan["max_retries"],
        timeout=60.0,
        http_client=http_client,
    )
    results = []
    for call in plan["calls"]:
        current = {"attempts": 0, "responses": []}
        result = {"ok": False, "content": None, "error": None}
        try:
            if call["api"] == "chat":
                completion = client.chat.completions.create(
                    model=call["model"],
                    messages=[{"role": "user", "content": "hello"}],
                )
                result["content"] = completion.choices[0].message.content
            elif call["api"] == "embeddings":
                client.embeddings.create(model=call["model"], input="hello")
            else:
                raise ValueError(f"unknown api {call['api']!r}")
            result["ok"] = True
        except openai.APIStatusError as e:
            result["error"] = {
                "type": type(e).__name__,
                "status": e.status_code,
                "code": e.code,
                "message": e.message,
            }
        except openai.APIError as e:
            result["error"] = {
                "type": type(e).__name__,
                "status": None,
                "code": None,
                "message": str(e),
            }
        result.update(current)
        results.append(result)
    print(json.dumps({"calls": results}), flush=True)


if __name__ == "__main__":
    main()
