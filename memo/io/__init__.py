"""File and hub input/output."""
