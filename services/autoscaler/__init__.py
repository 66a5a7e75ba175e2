"""The autoscaler: replica decisions from load samples (the HPA algorithm, lag, scale-to-zero) and
per-node container-start throttles from mount-stall samples."""
