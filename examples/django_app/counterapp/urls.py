"""``POST /count/<key>``: add one; ``GET /count/<key>``: the saved count; ``GET /health``."""

from __future__ import annotations

from django.urls import path

from . import views

urlpatterns = [
    path("count/<str:key>", views.count, name="count"),
    path("health", views.health, name="health"),
]
