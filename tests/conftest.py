"""Shared test configuration. Fixtures specific to one area live in tests/support/ modules."""

import os

# Tests share two cores with each other and with the services they start.
os.environ.setdefault("OMP_NUM_THREADS", "1")
