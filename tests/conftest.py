"""Shared test settings."""

import os

from hypothesis import settings

settings.register_profile("default", max_examples=60, deadline=None)
settings.register_profile("ci", max_examples=120, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")
