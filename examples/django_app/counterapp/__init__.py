"""A Django project with one sessionstore store, ``counters``: one session per request."""
