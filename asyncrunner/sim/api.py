"""The OpenAI chat-completions format as the simulator speaks it.

This module owns the JSON on both sides of a completion: reading the request body (model,
messages, sampling settings, response_format, the text to classify, whether it is a repair
turn), and writing the `chat.completion` answer, the model list and the `{"error": {...}}`
bodies. Pure functions, no I/O; `server.py` decides what to send.

Which text is classified (`narrative_text`):
  * a repair turn (the conversation goes on after an assistant message: `[system?, user,
    assistant, user]`) classifies the user turn before the last assistant turn, not the
    repair instruction;
  * otherwise the last user turn;
  * without a system message (asyncrunner's `system_role: user`), the part of that turn
    before its first blank line is taken as the system prompt and left out, so the
    prompt's own words ("partner violence") do not count as cues.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """What the simulator reads from a chat-completions body."""

    model: str                           # "" when absent
    messages: list[Message]
    temperature: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None        # max_tokens, else max_completion_tokens
    response_format: Any = None          # the field as sent (decoded JSON), None if absent

    @property
    def response_format_type(self) -> str:
        """"none" without the field, else its `type` ("json_schema", "json_object", ...)."""
        if self.response_format is None:
            return "none"
        if isinstance(self.response_format, dict):
            kind = self.response_format.get("type")
            return kind if isinstance(kind, str) and kind else "?"
        return "?"

    @property
    def schema(self) -> dict[str, Any] | None:
        """The JSON Schema of a json_schema response_format, if any."""
        fmt = self.response_format
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return None
        wrapper = fmt.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else fmt.get("schema")
        return schema if isinstance(schema, dict) else None


def parse_completion_body(body: bytes) -> CompletionRequest:
    """The request, or ValueError with a message fit for the client."""
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
    temperature = payload.get("temperature")
    seed = payload.get("seed")
    max_tokens = payload.get("max_tokens", payload.get("max_completion_tokens"))
    return CompletionRequest(
        model=model if isinstance(model, str) and model else "",
        messages=messages,
        temperature=(float(temperature) if isinstance(temperature, int | float)
                     and not isinstance(temperature, bool) else 0.0),
        seed=seed if _is_int(seed) else None,
        max_tokens=max_tokens if _is_int(max_tokens) else None,
        response_format=payload.get("response_format"),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)



def message_text(content: Any) -> str:
    """Message content as text: a plain string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def last_user_text(messages: list[Message]) -> str:
    """The last user message's text."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message.get("content"))
    return ""


def is_repair_turn(messages: list[Message]) -> bool:
    """The conversation goes on after an assistant turn: `[..., assistant, user]`."""
    return (len(messages) >= 3 and messages[-1].get("role") == "user"
            and any(m.get("role") == "assistant" for m in messages[:-1]))


def narrative_text(messages: list[Message]) -> str:
    """The text the simulated model classifies (see the module doc)."""
    turns = messages
    if is_repair_turn(messages):
        last_assistant = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        turns = messages[:last_assistant]
    text = last_user_text(turns)
    if not any(m.get("role") == "system" for m in messages):
        _, blank, rest = text.partition("\n\n")
        if blank:
            text = rest
    return text


def usage_tokens(messages: list[Message], content: str) -> tuple[int, int]:
    """(prompt, completion) tokens as the simulator counts them: 4 characters a token."""
    prompt_chars = sum(len(message_text(m.get("content"))) for m in messages)
    return max(1, prompt_chars // 4), max(1, len(content) // 4)


def chat_completion(completion_id: str, model: str, messages: list[Message], content: str,
                    finish_reason: str,
                    usage: tuple[int, int] | None = None) -> HttpResponse:
    """A 200 `chat.completion`; usage (prompt, completion tokens) defaults to
    `usage_tokens`, 4 characters per token."""
    prompt_tokens, completion_tokens = usage or usage_tokens(messages, content)
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
