"""A bounded soak runner: python -m tests.soak.run --minutes 10 (see run.py)."""
