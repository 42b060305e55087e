"""Counting what a run costs (FLOPs) on the real code path, shared by the scripts and the placement rule."""
