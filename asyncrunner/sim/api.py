"""The OpenAI chat-completions format as the simulator speaks it.

This module owns the JSON on both sides of a completion: reading the request body (model,
messages, the text to classify), and writing the `chat.completion` answer, the model list
and the `{"error": {...}}` bodies. Pure functions, no I/O; `server.py` decides what to send.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .http import HttpResponse

Headers = tuple[tuple[str, str], ...]
Message = dict[str, Any]


def json_response(status: int, payload: object, headers: Headers = ()) -> HttpResponse:
    return HttpResponse(status, json.dumps(payload).encode(), headers=headers)


def error_response(status: int, message: str, err_type: str,
                   headers: Headers = ()) -> HttpResponse:
    """An OpenAI-style error body, which clients read for the message."""
    return json_response(status, {"error": {"message": message, "type": err_type,
                                            "code": status}}, headers)


def parse_completion_body(body: bytes) -> tuple[str, list[Message]]:
    """(requested model or "", messages), or ValueError with a message fit for the client."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("request body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise ValueError("request body must be a JSON object")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) for m in messages):
        raise ValueError("'messages' must be a non-empty list of message objects")
    model = payload.get("model")
    return (model if isinstance(model, str) and model else ""), messages


def message_text(content: Any) -> str:
    """Message content as text: a plain string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def last_user_text(messages: list[Message]) -> str:
    """The text the simulated model classifies: the last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def chat_completion(completion_id: str, model: str, messages: list[Message], content: str,
                    finish_reason: str) -> HttpResponse:
    """A 200 `chat.completion` with usage estimated at 4 characters per token."""
    prompt_chars = sum(len(message_text(m.get("content"))) for m in messages)
    prompt_tokens = max(1, prompt_chars // 4)
    completion_tokens = max(1, len(content) // 4)
    return json_response(200, {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": content},
            "finish_reason": finish_reason,
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


def model_list(model: str, created: int) -> HttpResponse:
    return json_response(200, {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created,
                  "owned_by": "asyncrunner-mock"}],
    })
