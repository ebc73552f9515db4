"""KubeDream operator: FineTuneJob spec, rendering, status and the kopf controller."""
