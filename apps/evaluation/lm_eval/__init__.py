"""lm-eval with the `fast-steer` model: the adapter, local task YAMLs, and the plain-vs-steered comparison."""
