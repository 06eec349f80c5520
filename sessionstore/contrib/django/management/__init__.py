"""Management commands of the sessionstore app."""
