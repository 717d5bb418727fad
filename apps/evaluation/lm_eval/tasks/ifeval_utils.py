"""IFEval scoring for `ifeval_local`: lm-eval's own checkers, with NLTK's data read from a local folder.

`materialize_tasks` replaces the placeholder below with the NLTK data folder (`punkt_tab`), so the
checkers never try to download it.
"""

from __future__ import annotations

import nltk

nltk.data.path.insert(0, "__NLTK_DATA__")

from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: E402

__all__ = ["agg_inst_level_acc", "process_results"]
