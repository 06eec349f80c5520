"""``manage.py sessionstore``: the sessionstore command line with the DSN from settings."""
