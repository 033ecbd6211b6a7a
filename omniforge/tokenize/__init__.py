"""Tokenizers: from pseudo-labels to discrete tokens (the Ray job that applies them is pipeline/tokenize_job.py).

- models: ViT VQ-VAEs (EMA cosine codebook) for image-like labels and feature maps, Memcodes MLPs for
  global vectors, the SAM mask tokenizer; prepare/restore between label arrays and model inputs.
- text: the WordPiece vocabulary and the exact 4M-21 text forms of det, palette, metadata, poses, SAM.
- crops: crop settings (crop 0 centred, the others random and seeded per key) applied to every modality.
- train: `omniforge tokenizer train`.
- ml4m: Apple's released 4M tokenizers (ml-4m hub snapshots) in omniforge's own implementation, with ml-4m's
  preprocessing; a --tokenizers folder may hold them. import4m: `omniforge tokenizer import-4m`.
- export4m: a run's tokenizers in ml-4m's hub layout for `omniforge export-4m` (imported snapshots copied,
  Memcodes MLP tokenizers converted, omniforge's own ViT VQ-VAEs refused).
"""
