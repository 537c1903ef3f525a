"""Hypothesis settings for the whole suite.

No deadline (unit tests never carry a wall-clock limit). The default profile is derandomized, so every run
of `make test` - in CI and on a laptop - draws the same examples; HYPOTHESIS_PROFILE=explore draws new ones.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=40,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
