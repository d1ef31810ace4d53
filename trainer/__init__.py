"""Stages 2-3: the DALI input pipeline, the two-column AlexNet and Ray Train (planned)."""
