"""The loop and what it composes: the trainer, the warm-up, rollout collection, evaluation, the
jitted step programs and the factories that set up the model, engine and data."""
