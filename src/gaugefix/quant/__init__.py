"""Moving quantised checkpoints under a gauge: the packed data, scales and zero points."""
