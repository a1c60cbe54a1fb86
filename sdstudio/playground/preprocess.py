"""Control-image preprocessors for the Playground: the detectors that make training pairs (data/detectors.py),
under the names the Playground's recipes use."""
from __future__ import annotations

from ..data.detectors import NEEDS_WEIGHTS, OFFLINE, PREPROCESSORS, preprocess  # noqa: F401  (re-exported)
