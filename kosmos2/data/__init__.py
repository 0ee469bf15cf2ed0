"""Data: the GRIT construction pipeline, the GRIT-20M training reader and the synthetic grounded world."""
