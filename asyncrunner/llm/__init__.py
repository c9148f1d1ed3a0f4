"""Talking to the model: the HTTP transport, request building with retries and error mapping,
shared back-pressure and rate limits, and parsing of the model's answer."""
