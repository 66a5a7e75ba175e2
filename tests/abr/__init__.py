"""Unit tests of the adaptive-bitrate package (pure: no infrastructure)."""
