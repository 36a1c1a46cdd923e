"""Interop with the serving world: Hugging Face float checkpoints (`hf`) and compressed-tensors
checkpoints (`compressed_tensors`), each checked against the other side's own code."""
