"""httpx clients with the stack's defaults: explicit timeouts, bearer token, loopback-friendly pools."""

from __future__ import annotations

import httpx


def timeout(total_s: float, connect_s: float = 5.0) -> httpx.Timeout:
    """``total_s`` bounds each read/write; connecting fails fast so a dead worker is seen at once."""
    return httpx.Timeout(total_s, connect=min(connect_s, total_s))


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def make_client(api_key: str | None = None, timeout_s: float = 30.0, max_connections: int = 256,
                proxy_from_env: bool = False) -> httpx.Client:
    """``proxy_from_env``: route through ``HTTPS_PROXY`` & co. (an outside endpoint behind a proxy); never for the
    stack's own loopback services."""
    return httpx.Client(
        headers=auth_headers(api_key),
        timeout=timeout(timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=64),
        trust_env=proxy_from_env,
    )


def error_detail(response: httpx.Response) -> str:
    """The ``detail`` of a FastAPI error response or the ``error.message`` of an OpenAI-style one, else
    the start of the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list) and all(isinstance(e, dict) and "msg" in e for e in detail):  # a 422
            return "; ".join(f"{'.'.join(map(str, e.get('loc') or ())) or 'request'}: {e['msg']}" for e in detail)[:300]
        return detail if isinstance(detail, str) else str(detail)[:300]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"][:300]
    return str(body)[:300]
