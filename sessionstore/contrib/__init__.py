"""Integrations of sessionstore with web frameworks and tools (Django, Flask, ...).

Each sub-package imports its framework only when it is itself imported; importing
``sessionstore`` never imports any of them.
"""
