"""One session per request: the key is loaded, changed and saved within the request.

``POST /count/<key>`` increments the key's count inside
``with get_store("counters").session(key) as s``: when the block exits (the
last block on that key in this process) the change is saved and the lease
released, so the count answered is durable and the key is free for any
other worker. ``GET /count/<key>`` reads the saved count with ``peek``
(no lease taken).
"""

from __future__ import annotations

import os
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_http_methods

import sessionstore as ss
from sessionstore.contrib.django import get_store


def valid_counter(data: Any) -> tuple[bool, str]:
    """The store's schema (``"schema": "counterapp.views.valid_counter"`` in the settings)."""
    count = data.get("count") if isinstance(data, dict) else None
    ok = isinstance(count, int) and not isinstance(count, bool) and count >= 0
    return ok, "" if ok else "count must be an int >= 0"


@csrf_exempt  # an API endpoint for the example; use your authentication and CSRF policy
@require_http_methods(["GET", "POST"])
def count(request: HttpRequest, key: str) -> HttpResponse:
    """Add one to ``key``'s count (POST) or read it (GET)."""
    store = get_store("counters")
    try:
        if request.method == "POST":
            made: list[int] = []

            def add_one(data: Any) -> bool:
                data["count"] += 1
                made.append(data["count"])  # this change's count: get() may show a later one
                return True

            with store.session(key) as s:
                s.update(add_one)
            value = made[0]
            # The block has exited: the increment is saved (durable) by now.
        else:
            saved = store.peek(key)
            value = saved["count"] if saved is not None else 0
    except ss.LockUnavailableError:
        # Another worker kept the key for longer than lock_timeout: ask to retry.
        return JsonResponse({"error": "busy", "key": key}, status=503, headers={"Retry-After": "1"})
    except ss.InvalidKeyError as exc:
        return JsonResponse({"error": str(exc)}, status=400)
    return JsonResponse({"key": key, "count": value, "pid": os.getpid()})


@require_GET
def health(request: HttpRequest) -> HttpResponse:
    """Readiness: answers without touching the store."""
    return JsonResponse({"pid": os.getpid()})
