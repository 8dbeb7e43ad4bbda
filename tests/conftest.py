"""Shared test settings: a fixed-seed hypothesis profile for CI, a faster default locally."""
import os

from hypothesis import HealthCheck, settings

# CI: derandomised (same examples every run), no deadline (the machine is shared and noisy).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, max_examples=30)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))
