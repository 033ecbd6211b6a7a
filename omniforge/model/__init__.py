"""The 4M-21-style network, masking, trainer and sampler (issue 5). Nothing public yet."""
