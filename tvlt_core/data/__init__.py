"""Training data: a streaming WebDataset loader over the shards of a manifest (``stream``), the per-epoch plan of
who reads what (``plan``), and the per-task batchers that turn decoded samples into model inputs (``batches``)."""

from tvlt_core.data.batches import TvltBatcher, TvpBatcher
from tvlt_core.data.snapshot import DataSnapshot
from tvlt_core.data.stream import Batcher, DataError, ReadPolicy, StreamingLoader

__all__ = ["Batcher", "DataError", "DataSnapshot", "ReadPolicy", "StreamingLoader", "TvltBatcher", "TvpBatcher"]
