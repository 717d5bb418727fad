"""Offline work on data: loading conversations and text, FAST / BT sequences, harvesting, the mixing buffer,
the activation stream, the trainer and evaluation."""

from train.activation_cache import CachedActivationStream, write_cache
from train.activations import ActivationStream
from train.buffer import MixingBuffer
from train.config import SAETrainSpec, TrainConfig, preset_config
from train.data import Corpus, DataFormatError, load_conversations, load_texts, split_by_hash
from train.eval_run import evaluate_folder
from train.evaluate import EvalConfig, EvalResult, evaluate_sae
from train.features import FeatureContext, FeatureReport, discover_features, top_contexts
from train.harvest import Harvester, harvest_throughput
from train.pipeline import train
from train.run_config import DataConfig, RunConfig, StreamSettings
from train.sequences import Batch, bucket_batches, fast_sequences, pack_blocks
from train.trainer import SAETrainer, TrainResult

__all__ = [
    "CachedActivationStream",
    "DataConfig",
    "RunConfig",
    "StreamSettings",
    "EvalConfig",
    "EvalResult",
    "SAETrainSpec",
    "SAETrainer",
    "TrainConfig",
    "TrainResult",
    "evaluate_folder",
    "evaluate_sae",
    "preset_config",
    "train",
    "write_cache",
    "ActivationStream",
    "Batch",
    "Corpus",
    "DataFormatError",
    "FeatureContext",
    "FeatureReport",
    "Harvester",
    "MixingBuffer",
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
