"""Weights from elsewhere, below the model: Hugging Face CLIP and SigLIP checkpoints (huggingface), open_clip
checkpoints (openclip), and LoRA adapters on a tower (lora). Each turns foreign weights into liteclip's config and
state dict, or wraps a library thinly; they import nothing of liteclip but its config, errors and files, so the model
and its folder format (liteclip.pretrained) can build on them.
"""
