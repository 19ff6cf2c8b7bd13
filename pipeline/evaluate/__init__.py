"""Score an annotate output against ground truth: ``run_evaluation(EvaluateConfig) -> EvaluationResult``.

* :mod:`pipeline.evaluate.run` - read both sides, pair them, feed the metrics;
* :mod:`pipeline.evaluate.metrics` - PQ / SQ / RQ, mIoU, mask AP accumulators (pure numpy).
"""
