"""A `--tokenizers` directory: one subfolder per trained tokenizer, loaded on first use.

    DIR/text/tokenizer.json                    the WordPiece vocabulary every sequence modality shares
    DIR/<modality>/config.json + model.safetensors   a VQ-VAE or Memcodes tokenizer (`omniforge tokenizer train`)
    DIR/sam_mask/config.json + model.safetensors     the SAM instance-mask VQ-VAE

A model folder may instead hold a snapshot of one of Apple's released tokenizers (ml-4m's hub layout,
`omniforge tokenizer import-4m` lays them out): it loads through `omniforge.tokenize.ml4m`, and the labels
of its modality get ml-4m's preprocessing (`TokenizerKind.prepare_for`).

Which folders a modality needs is its tokenizer kind's business (`TokenizerKind.artifacts`); this class
finds, fingerprints, loads and caches them (local or s3://).
"""

from __future__ import annotations

import hashlib
import os
from typing import TYPE_CHECKING

import numpy as np

from omniforge import storage
from omniforge.errors import ConfigError

if TYPE_CHECKING:
    from omniforge.tokenize.kinds import Artifact, TokenizerKind
    from omniforge.tokenize.models import Tokenizer
    from omniforge.tokenize.text import TextTokenizer

_ENCODE_BATCH = 64


class TokenizerStore:
    def __init__(self, directory: str, device: str = "cpu"):
        self.directory = storage.normalize(directory)
        self.device = device
        self._models: dict[str, Tokenizer] = {}
        self._text: TextTokenizer | None = None

    def path(self, folder: str, *parts: str) -> str:
        return storage.join(self.directory, folder, *parts)

    def require(self, artifact: Artifact) -> list[str]:
        """The URIs of a trained tokenizer's files; ConfigError saying how to train it when one is missing."""
        uris = [self.path(artifact.folder, name) for name in artifact.files]
        for uri in uris:
            if not storage.exists(uri):
                raise ConfigError(f"no {artifact.folder} tokenizer in {self.directory} ({uri} is missing): "
                                  f"{artifact.train_hint(self.directory)}")
        return uris

    def fingerprint(self, artifact: Artifact) -> str:
        """Content hash of a trained tokenizer's files."""
        h = hashlib.sha256()
        for uri in self.require(artifact):
            h.update(storage.read_bytes(uri))
        return h.hexdigest()[:16]

    def text(self) -> TextTokenizer:
        """The shared WordPiece vocabulary."""
        if self._text is None:
            from omniforge.tokenize.kinds import text_artifact
            from omniforge.tokenize.text import TextTokenizer

            (uri,) = self.require(text_artifact())
            self._text = TextTokenizer.from_file(_local(uri))
        return self._text

    def model(self, kind: TokenizerKind) -> Tokenizer:
        """The trained model of a kind's artifact (cached per folder)."""
        folder = kind.artifact.folder
        if folder not in self._models:
            self.require(kind.artifact)  # a clear "train it with ..." when it is missing
            self._models[folder] = kind.load(_local(self.path(folder)), device=self.device)
        return self._models[folder]

    def codebook_size(self, kind: TokenizerKind) -> int | None:
        """The trained codebook of a kind's model (a tiny tokenizer has 128 codes, not the registry's), or None
        when the folder has no trained model."""
        import json

        from omniforge.tokenize import ml4m

        uri = self.path(kind.artifact.folder, "config.json")
        if kind.model_kind is None or not storage.exists(uri):
            return None
        config = json.loads(storage.read_bytes(uri))
        if ml4m.is_snapshot_config(config):
            return ml4m.ML4MConfig.from_dict(config, source=uri).codebook_size
        return int(config["config"]["codebook_size"])

    def encode(self, kind: TokenizerKind, arrays: list[np.ndarray]) -> np.ndarray:
        """Model-input arrays -> int16 token ids (len(arrays), num_tokens), in batches."""
        import torch

        model = self.model(kind)
        out = []
        with torch.inference_mode():
            for i in range(0, len(arrays), _ENCODE_BATCH):
                x = kind.prepare_for(model, arrays[i:i + _ENCODE_BATCH]).to(self.device)
                out.append(model.encode(x).cpu().numpy())
        return np.concatenate(out).astype(np.int16)


def _cache_path(uri: str) -> str:
    import tempfile

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "omniforge-tokenizers", digest, uri.rstrip("/").rsplit("/", 1)[-1])


def _fetch(uri: str, dest: str) -> None:
    if not os.path.exists(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest + ".tmp", "wb") as f:
            f.write(storage.read_bytes(uri))
        os.replace(dest + ".tmp", dest)


def _local(uri: str) -> str:
    """A local path for a tokenizer file or folder: itself, or for s3:// a copy in a cache folder."""
    if not storage.is_s3(uri):
        return uri
    dest = _cache_path(uri)
    files = storage.list_files(uri)
    if not files:  # a single file
        _fetch(uri, dest)
        return dest
    for remote, _ in files:
        _fetch(remote, os.path.join(dest, remote[len(uri):].lstrip("/")))
    return dest
