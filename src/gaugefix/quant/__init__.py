"""Quantised checkpoints: GGUF files (:mod:`.gguf_file`) and Hugging Face quantised formats
(:mod:`.hf`: GPTQ, AWQ, compressed-tensors, FP8).

Each format says, per tensor and per move, whether the move is exact on the packed data,
needs the format's own quantiser (dequantise, move, requantise: the added error recorded), or
is refused with the reason.
"""
