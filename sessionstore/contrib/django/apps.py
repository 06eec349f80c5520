"""The Django app ``sessionstore.contrib.django`` (label ``sessionstore``)."""

from __future__ import annotations

from django.apps import AppConfig


class SessionStoreConfig(AppConfig):
    """Registers the system checks and resets the stores when ``override_settings`` changes
    ``SESSIONSTORE`` or ``DATABASES``. Creates no store: :func:`get_store` does, lazily."""

    name = "sessionstore.contrib.django"
    label = "sessionstore"
    verbose_name = "sessionstore"
    default = True

    def ready(self) -> None:
        from django.core import checks
        from django.core.signals import setting_changed

        from . import _setting_changed
        from .checks import TAG, check_sessionstore

        checks.register(check_sessionstore, TAG)
        setting_changed.connect(_setting_changed, dispatch_uid="sessionstore.setting_changed")
