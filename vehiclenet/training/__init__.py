"""Fine-tuning: the pieces a training script composes (data pipeline, optimizer, train step,
checkpoints, data-parallel workers) and :func:`~vehiclenet.training.finetune.finetune`."""
