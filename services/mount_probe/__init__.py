"""The mount-stall node agent: container-start mount sequences, for real, in private mount namespaces."""
