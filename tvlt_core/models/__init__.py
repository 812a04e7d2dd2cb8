"""Model classes under the reference implementation's names (parameter names match the public checkpoints)."""

from tvlt_core.models.tvlt import (  # noqa: F401  (TVLT)
    TVLT_PRESETS,
    TvltConfig,
    TvltForAudioVisualClassification,
    TvltForPreTraining,
    TvltModel,
)
from tvlt_core.models.tvp import TvpConfig, TvpForVideoGrounding, TvpModel  # noqa: F401  (TVP)
