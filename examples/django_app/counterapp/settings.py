"""Settings of the example project, from environment variables.

``DB_NAME`` (default ``postgres``), ``DB_USER``, ``DB_PASSWORD``, ``DB_HOST``
(a hostname or a socket directory such as ``/var/run/postgresql``),
``DB_PORT``: the PostgreSQL database, as Django's own ``DATABASES``; sessionstore
builds its DSN from it. ``SESSIONSTORE_SCHEMA`` (default ``sessionstore``) is
the schema of sessionstore's tables and ``COUNTER_STORE`` (default
``counters``) the name of the store in the database.
"""

from __future__ import annotations

import os
from typing import Any

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-a-secret")
DEBUG = os.environ.get("DJANGO_DEBUG") == "1"
ALLOWED_HOSTS = ["127.0.0.1", "localhost", "[::1]"]
ROOT_URLCONF = "counterapp.urls"
WSGI_APPLICATION = "counterapp.wsgi.application"
USE_TZ = True
TIME_ZONE = "UTC"

INSTALLED_APPS = ["sessionstore.contrib.django"]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

DATABASES: dict[str, dict[str, Any]] = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("DB_NAME", "postgres"),
        "USER": os.environ.get("DB_USER", ""),
        "PASSWORD": os.environ.get("DB_PASSWORD", ""),
        "HOST": os.environ.get("DB_HOST", ""),
        "PORT": os.environ.get("DB_PORT", ""),
    }
}

SESSIONSTORE: dict[str, Any] = {
    "DATABASE": "default",
    "OPTIONS": {
        "db_schema": os.environ.get("SESSIONSTORE_SCHEMA", "sessionstore"),
        # How long a request waits for a key another worker holds: well below
        # gunicorn's --timeout (30 s), so a busy key fails the request with
        # LockUnavailableError (a 503 here) instead of getting the worker killed.
        "lock_timeout": 10.0,
    },
    "STORES": {
        "counters": {
            "name": os.environ.get("COUNTER_STORE", "counters"),
            "template": {"count": 0},
            "schema": "counterapp.views.valid_counter",
        },
    },
}

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "sessionstore": {"handlers": ["console"], "level": "WARNING"},
        "counterapp": {"handlers": ["console"], "level": "INFO"},
    },
}
