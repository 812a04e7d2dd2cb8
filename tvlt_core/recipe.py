"""The TVLT input recipe as plain numbers, without torch: what the shards, the preprocessing and the model agree on.

``tvlt_core.audio`` and ``tvlt_core.video`` implement the transforms and re-export these names; code that only
plans, validates or probes (the preprocessing config, its probe actors) imports them from here and so does not pay
torch's import (seconds per process on a small machine, paid by every Ray worker that imports it).
"""

from __future__ import annotations

# Audio: mono 44.1 kHz -> log-mel spectrogram (time, NUM_MEL_BINS), one frame per HOP_LENGTH samples.
SAMPLE_RATE = 44100
N_FFT = 2048
HOP_LENGTH = 512  # 44100 // 86 in the reference feature extractor
NUM_MEL_BINS = 128
MAX_FRAMES = 2048  # spectrogram_length of the public checkpoints (about 23.8 s)

# Video: TVLT_NUM_FRAMES frames per clip, resized and centre-cropped to TVLT_IMAGE_SIZE square.
TVLT_IMAGE_SIZE = 224
TVLT_NUM_FRAMES = 8

# Preprocessing defaults (``pipelines.config``): pretrain clips of CLIP_LENGTH_S every CLIP_STRIDE_S (a trailing
# one kept from CLIP_MIN_LENGTH_S); grounding: GROUNDING_FRAMES frames per video, longest edge GROUNDING_SIZE.
# Serving falls back to them for a checkpoint that does not say which recipe its shards had.
CLIP_LENGTH_S = 10.0
CLIP_STRIDE_S = 10.0
CLIP_MIN_LENGTH_S = 1.0
GROUNDING_FRAMES = 48
GROUNDING_SIZE = 448
