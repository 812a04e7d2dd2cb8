"""Evaluation of TVLT and TVP checkpoints on shards: metrics beside their references, in one process or on Ray.

    report = evaluate(model_uri, data_url, EvalSettings(), EvalParallel(actors=2))
    print(report.table())

``runner`` cuts the data into units and runs them; ``tvlt`` and ``tvp`` hold what is measured for each model;
``report`` is the result; ``registry`` logs it to MLflow and moves aliases on improvement.
"""

from tvlt_core.eval.report import Report, Row
from tvlt_core.eval.runner import evaluate, model_folder, model_type
from tvlt_core.eval.settings import EvalParallel, EvalSettings, EvalUnit, eval_units

__all__ = ["EvalParallel", "EvalSettings", "EvalUnit", "Report", "Row", "eval_units", "evaluate", "model_folder",
           "model_type"]
