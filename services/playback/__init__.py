"""Playback: entitlement-checked sessions steered to Open Connect appliances (see README.md)."""
