"""omniforge: the data engine for any-to-any multimodal vision models.

Pseudo-label image corpora with specialist teachers on Ray, tokenize the labels, train 4M-21-style models.
"""

__version__ = "0.2.0"
