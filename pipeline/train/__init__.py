"""Fine-tune the mask generator and the implicit captioner: ``run_training(TrainConfig) -> TrainSummary``.

* :mod:`pipeline.train.run` - the training loop, checkpoints, metrics, periodic evaluation (Ray Train for DDP);
* :mod:`pipeline.train.data` - labeled shards -> augmented, deterministic, resumable training samples.
"""
