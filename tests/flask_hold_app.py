"""The Flask example (examples/flask_app/app.py) plus one route to die in, for gunicorn tests.

``POST /hold/<key>`` increments the key inside its ``stores.session`` block,
like ``POST /count/<key>``, but then writes ``{"pid": ..., "key": ...}`` to
``$FLASK_TEST_HOLD_DIR/<key>.json`` and stays in the block (holding the key's
lease, its change unsaved) until the worker is killed, which is what
tests/test_contrib_flask.py does to it with SIGKILL. The increment is never
acknowledged, so it must never be counted. Everything else is the example's.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from app import COUNTERS, create_app, stores  # examples/flask_app, on gunicorn's --pythonpath

HOLD_SECONDS = 60.0
"""How long a held request waits to be killed before it gives up (and fails)."""

app = create_app()


def _increment(data: dict[str, Any]) -> bool:
    data["count"] += 1
    return True


@app.post("/hold/<key>")
def hold(key: str) -> tuple[dict[str, Any], int]:
    with stores.session(COUNTERS, key) as s:
        s.update(_increment)
        marker = Path(os.environ["FLASK_TEST_HOLD_DIR"], f"{key}.json")
        partial = marker.with_suffix(".tmp")
        partial.write_text(json.dumps({"pid": os.getpid(), "key": key}))
        partial.rename(marker)  # the test never reads half a file
        threading.Event().wait(HOLD_SECONDS)  # killed here
    return {"error": "not killed"}, 500
