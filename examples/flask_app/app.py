"""A Flask app keeping a counter per key in sessionstore, one session per request.

``POST /count/<key>`` adds one to the key's count inside
``with stores.session(...)``: the key is loaded (its lease taken) when the
block starts and saved and released when it ends, so the answer is sent only
once the new count is durable, and any worker may serve the next request for
the key. ``GET /count/<key>`` reads the saved count with ``peek`` (no lease).

Run it under gunicorn (``--preload`` is safe: Stores are made per worker, on
first use)::

    pip install 'sessionstore[flask]' gunicorn
    export SESSIONSTORE_DSN=postgresql://user:password@localhost:5432/app
    gunicorn --preload --workers 3 --chdir examples/flask_app app:app
    curl -X POST localhost:8000/count/alice     # {"count": 1, "key": "alice"}
    curl localhost:8000/count/alice             # {"count": 1, "key": "alice"}

Configured by environment variables:

* ``SESSIONSTORE_DSN``: the database (read by sessionstore itself; without it,
  the embedded server). ``FLASK_SESSIONSTORE_DSN`` sets the app's
  ``SESSIONSTORE_DSN`` instead (Flask's ``from_prefixed_env``), as does a
  PostgreSQL ``FLASK_SQLALCHEMY_DATABASE_URI``.
* ``FLASK_SESSIONSTORE_OPTIONS__db_schema``, ``..._takeover_grace`` and any
  other ``FLASK_SESSIONSTORE_OPTIONS__<option>``: Store options (values are
  parsed as JSON: ``1.0`` is a number).
* ``COUNTERS_STORE``: the store's name (default ``counters``).
"""

from __future__ import annotations

import os
from typing import Any

from flask import Blueprint, Flask

import sessionstore as ss
from sessionstore.contrib.flask import SessionStores

COUNTERS = os.environ.get("COUNTERS_STORE", "counters")

stores = SessionStores()
stores.register(COUNTERS, {"count": 0})

counters = Blueprint("counters", __name__)


@counters.post("/count/<key>")
def increment(key: str) -> dict[str, Any]:
    """Add one to ``key``'s count; answer the count it made, once it is saved."""
    made: list[int] = []

    def add_one(data: dict[str, Any]) -> bool:
        data["count"] += 1
        made.append(data["count"])  # this change's count: get() may show a later thread's
        return True

    with stores.session(COUNTERS, key) as s:
        s.update(add_one)
    return {"key": key, "count": made[0]}


@counters.get("/count/<key>")
def read(key: str) -> dict[str, Any]:
    """The saved count of ``key`` (0 for a key never counted)."""
    data = stores[COUNTERS].peek(key)
    return {"key": key, "count": 0 if data is None else data["count"]}


@counters.errorhandler(ss.LockUnavailableError)
def busy(exc: ss.LockUnavailableError) -> tuple[dict[str, str], int, dict[str, str]]:
    """Another process kept the key for longer than ``lock_timeout``: try again later."""
    return {"error": str(exc)}, 503, {"Retry-After": "1"}


def create_app(**config: Any) -> Flask:
    """The app: defaults, then ``FLASK_*`` environment variables, then ``config``."""
    app = Flask(__name__)
    # lock_timeout well below gunicorn's --timeout (30 s by default): a request
    # waiting for a busy key fails with 503 before its worker is killed.
    app.config["SESSIONSTORE_OPTIONS"] = {"lock_timeout": 10.0}
    app.config.from_prefixed_env()
    app.config.update(config)
    stores.init_app(app)
    app.register_blueprint(counters)
    return app


app = create_app()
