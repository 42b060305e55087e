"""Conditioning signals computed from the inputs: audio features and emotion labels."""
