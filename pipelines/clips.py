"""Clip sampling lives in ``tvlt_core.clips`` (serving plans a raw video's clips the same way, and the library
never imports ``pipelines``); re-exported here for the preprocessing code and its tests."""

from tvlt_core.clips import Clip, frame_indices, frame_times, sample_range, segments, whole, windows  # noqa: F401
