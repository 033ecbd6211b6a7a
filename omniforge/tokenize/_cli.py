"""Argument parsing for `omniforge tokenizer ...`, kept free of heavy imports (torch loads only to run)."""

from __future__ import annotations

from typing import Any


def add_cli(subparsers: Any) -> None:
    """Register `omniforge tokenizer train|import-4m ...` on the top-level subparsers."""
    p = subparsers.add_parser("tokenizer", help="train tokenizers on label shards, or import Apple's released ones")
    sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="train one tokenizer on label shards and report its reconstruction quality")
    t.add_argument("--data", required=True, help="label root holding <modality>/shard-*.tar (local or s3://)")
    t.add_argument("--modality", required=True, help="label modality whose tokenizer to train (`omniforge list`); its "
                   "tokenizer kind decides what: a VQ-VAE, a Memcodes MLP, the SAM mask tokenizer, or the shared "
                   "WordPiece vocabulary from a plain-text modality")
    t.add_argument("--out", required=True, help="tokenizers directory: the tokenizer lands in OUT/<name>/")
    t.add_argument("--config", default="tiny", choices=["tiny", "base"], help="model size (default tiny)")
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (warm-up, then cosine)")
    t.add_argument("--max-samples", type=int, default=None, help="use only the first N samples")
    t.add_argument("--num-workers", type=int, default=0, help="data loader workers per process")
    t.add_argument("--vocab-size", type=int, default=30000, help="text tokenizer vocabulary (caption only)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--restart", action="store_true", help="ignore a saved training state and start over")
    t.add_argument("--architecture", default="omniforge", choices=["omniforge", "ml4m"],
                   help="ViT VQ-VAE kinds: omniforge's own (default) or ml-4m's, saved in ml-4m's hub layout so that "
                        "`omniforge export-4m` can write it for ml-4m's VQVAE.from_pretrained")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(fn=_cmd_train)
    i = sub.add_parser("import-4m", help="lay Apple's released 4M tokenizers (ml-4m hub snapshots) out as a "
                                         "--tokenizers folder and print what each covers")
    i.add_argument("sources", nargs="+", metavar="SRC",
                   help="a snapshot folder, a folder of them (named like the hub repositories, e.g. "
                        "4M_tokenizers_depth_8k_224-448; it may hold text_tokenizer_4m_wordpiece_30k.json), a Hugging "
                        "Face cache, or a hub id such as EPFL-VILAB/4M_tokenizers_depth_8k_224-448 (downloaded)")
    i.add_argument("--out", required=True, help="tokenizers directory (local) to write: OUT/<modality>/, OUT/text/")
    i.add_argument("--link", action="store_true", help="symlink the weights instead of copying them")
    i.add_argument("--overwrite", action="store_true", help="replace tokenizer folders that exist in OUT")
    i.set_defaults(fn=_cmd_import_4m)


def _cmd_train(args: Any) -> int:
    from omniforge.tokenize.train import cmd_tokenizer_train

    return cmd_tokenizer_train(args)


def _cmd_import_4m(args: Any) -> int:
    from omniforge.tokenize.import4m import cmd_import_4m

    return cmd_import_4m(args)
