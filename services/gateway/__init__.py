"""The gateway service: server.py (endpoints, validation, admission), route.py (one request's
way through prefill and decode workers, with retries)."""
