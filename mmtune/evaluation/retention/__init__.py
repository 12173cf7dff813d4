"""Forgetting checks: general-capability sets scored on the untuned model and on the tuned one.

One scorer per kind, registered in `SCORERS` and refusing a task it does not fit: `text_loss` and
`lm_eval` (causal LMs), `zero_shot` and `retrieval` (aligners and embedding models), `feature_agreement`
(image classifiers). `RetentionCallback` runs them during `mmtune fit`; the result is metrics.json's
`retention` entry: `{"sets": [{name, kind, metric, before, after, change, drop, higher_is_better,
threshold, relative, status}]}` with status `ok`, `warn` or `fail`.
"""

from mmtune.evaluation.retention.callback import RetentionCallback, retention_callbacks, score_sets
from mmtune.evaluation.retention.scorers import SCORERS, RetentionError, Runner, Scorer
from mmtune.evaluation.retention.spec import RetentionSet, RetentionSpec, as_retention_spec
from mmtune.evaluation.retention.table import format_table, retention_rows

__all__ = ["RetentionCallback", "RetentionError", "RetentionSet", "RetentionSpec", "Runner", "SCORERS", "Scorer",
           "as_retention_spec", "format_table", "retention_callbacks", "retention_rows", "score_sets"]
