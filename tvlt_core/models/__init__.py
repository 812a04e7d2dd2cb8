"""Model classes under the reference implementation's names (parameter names match the public checkpoints)."""

from tvlt_core.models.tvp import TvpConfig, TvpForVideoGrounding, TvpModel  # noqa: F401  (TVP)
