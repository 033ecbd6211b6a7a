"""Tokenizers: from pseudo-labels to discrete tokens (the Ray job that applies them is pipeline/tokenize_job.py).

- models: ViT VQ-VAEs (EMA cosine codebook) for image-like labels and feature maps, Memcodes MLPs for
  global vectors, the SAM mask tokenizer; prepare/restore between label arrays and model inputs.
- text: the WordPiece vocabulary and the exact 4M-21 text forms of det, palette, metadata, poses, SAM.
- crops: crop settings (crop 0 centred, the others random and seeded per key) applied to every modality.
- train: `omniforge tokenizer train`.
"""
