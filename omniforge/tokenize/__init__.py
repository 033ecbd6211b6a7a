"""Tokenizers and the pre-tokenization job (issue 4). Nothing public yet."""
