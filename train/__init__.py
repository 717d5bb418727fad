"""Offline work on data: loading conversations and text, FAST / BT sequences, harvesting, the mixing buffer,
the activation stream, the trainer and evaluation."""

from train.activations import ActivationStream, StreamConfig
from train.buffer import MixingBuffer
from train.data import Corpus, DataFormatError, load_conversations, load_texts, split_by_hash
from train.features import FeatureContext, FeatureReport, discover_features, top_contexts
from train.harvest import Harvester, harvest_throughput
from train.sequences import Batch, bucket_batches, fast_sequences, pack_blocks

__all__ = [
    "ActivationStream",
    "Batch",
    "Corpus",
    "DataFormatError",
    "FeatureContext",
    "FeatureReport",
    "Harvester",
    "MixingBuffer",
    "StreamConfig",
    "bucket_batches",
    "discover_features",
    "fast_sequences",
    "harvest_throughput",
    "load_conversations",
    "load_texts",
    "pack_blocks",
    "split_by_hash",
    "top_contexts",
]
