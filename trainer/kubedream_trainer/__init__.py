"""KubeDream trainer: EveryDream-style fine-tuning of diffusion models, locally or in a pod."""
