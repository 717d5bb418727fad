"""Neuronpedia export: a run's features, activations and explanations as Neuronpedia's bulk-import files."""

from apps.interp.neuronpedia.export import NeuronpediaConfig, export_neuronpedia
from apps.interp.neuronpedia.schema import SCHEMAS, NeuronpediaSchemaError, read_export, validate

__all__ = [
    "SCHEMAS",
    "NeuronpediaConfig",
    "NeuronpediaSchemaError",
    "export_neuronpedia",
    "read_export",
    "validate",
]
