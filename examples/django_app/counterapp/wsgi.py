"""WSGI entry point: ``gunicorn counterapp.wsgi`` (``--preload`` is safe: no store is made here).

Importing this module sets Django up and prepares the stores (settings
checked, code imported, sessionstore's schema revisions loaded) without
connecting; each store is created by the first request of each worker
(``get_store``), never in a gunicorn master.
"""

from __future__ import annotations

import logging
import os

from django.core.wsgi import get_wsgi_application

from sessionstore.contrib.django import prepare

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "counterapp.settings")

application = get_wsgi_application()
prepare()  # no request pays for loading what a store needs (no connection made here)
logging.getLogger("counterapp").info("counterapp ready (pid %d)", os.getpid())
