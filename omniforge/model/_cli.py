"""Argument parsing for `omniforge train` and `omniforge sample`, free of heavy imports (torch loads to run)."""

from __future__ import annotations

from typing import Any

SCHEDULES = ("cosine", "linear")
DTYPES = ("auto", "bf16", "fp32")
STRATEGIES = ("ddp", "fsdp")
ORDERS = ("maskgit", "random")
SEQUENCE_SAMPLINGS = ("ml4m", "omniforge")
TARGET_ALIASES = {"temp": "temperature", "temp_schedule": "temperature_schedule", "cfg": "guidance_scale"}


TRAIN_FLAGS: dict[str, dict[str, Any]] = {
    "data": dict(help="token root holding tok_* folders (local or s3://); several, comma-separated, are mixed"),
    "data_weights": dict(help="with several --data roots: the share of samples drawn from each, e.g. 0.8,0.2"),
    "modalities": dict(help="comma-separated folders, e.g. rgb@224,tok_rgb@224,tok_depth@224,tok_caption (rgb@224: "
                        "raw-pixel input, cropped from the rgb labels; t5_caption: caption embeddings, an input "
                        "read from their label folder)"),
    "out": dict(help="run directory (checkpoints, log.jsonl, loss.png); an existing run resumes"),
    "tokenizers": dict(help="tokenizers directory holding text/tokenizer.json (for sequence modalities)"),
    "model": dict(help="model size: tiny | B | L | XL"),
    "masking": dict(help="masking YAML (ml-4m alphas mixture or MaskingConfig fields); default: uniform"),
    "input_tokens": dict(type=int, help="encoder tokens per sample"),
    "target_tokens": dict(type=int, help="decoder target tokens per sample"),
    "steps": dict(type=int), "batch_size": dict(type=int, help="samples per batch per rank"),
    "grad_accum": dict(type=int, help="batches per optimizer step"),
    "lr": dict(type=float, help="peak learning rate (linear warm-up, then cosine to --final-lr)"),
    "warmup_steps": dict(type=int), "final_lr": dict(type=float), "weight_decay": dict(type=float),
    "grad_clip": dict(type=float, help="max gradient norm (0: no clipping)"),
    "seed": dict(type=int), "device": dict(help="auto | cpu | cuda | cuda:N"),
    "dtype": dict(choices=DTYPES), "strategy": dict(choices=STRATEGIES, help="under torchrun: ddp | fsdp"),
    "log_every": dict(type=int), "save_every": dict(type=int, help="checkpoint period in steps"),
    "num_workers": dict(type=int, help="data loader workers per rank"), "shuffle_buffer": dict(type=int),
    "eval_data": dict(help="held-out token root (tokenized like --data): its loss goes to eval.jsonl, TensorBoard "
                      "and loss.png"),
    "eval_every": dict(type=int, help="steps between held-out evaluations (default: --save-every)"),
    "eval_batches": dict(type=int, help="batches per rank per evaluation (the same samples and masks each time)"),
    "init_from": dict(metavar="DIR", help="start from a released 4M / 4M-21 checkpoint (hub layout: config.json + "
                      "model.safetensors) or an omniforge checkpoint: its model config replaces --model, its "
                      "modalities the run does not use are dropped, the run's others start fresh; a run with a "
                      "checkpoint in --out resumes instead"),
}


def add_train_cli(subparsers: Any) -> Any:
    """Register ``omniforge train`` on the top-level subparsers; returns its parser."""
    p = subparsers.add_parser("train", help="train the 4M-21-style model on token shards (torchrun for DDP/FSDP)")
    p.add_argument("--config", default=None, metavar="NAME|FILE",
                   help="a model size (tiny, B, L, XL) or a YAML file of train settings (these flags' names, "
                        "with underscores); flags given on the command line override it")
    for name, kw in TRAIN_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the transformer blocks (dynamic shapes)")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false", default=None,
                   help="do not write TensorBoard scalars")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=_cmd_train)
    return p


def _cmd_train(args: Any) -> int:
    from omniforge.model.train import cmd_train

    return cmd_train(args)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def add_sample_cli(subparsers: Any) -> None:
    """Register `omniforge sample ...` on the top-level subparsers."""
    p = subparsers.add_parser("sample", help="generate modalities of one sample from a trained 4M checkpoint")
    p.add_argument("--checkpoint", required=True, help="training run directory (uses `latest`) or a "
                   "checkpoint-<step> directory")
    p.add_argument("--input", required=True, help="corpus root holding the token shards (local or s3://)")
    p.add_argument("--key", dest="keys", required=True, type=_csv,
                   help="sample key, or several comma-separated (crop 0 of its token shards is used)")
    p.add_argument("--from", dest="sources", required=True, type=_csv,
                   help="comma-separated inputs: modality names (rgb: raw pixels when the model takes rgb@224, else "
                        "its tokens) or folders, e.g. rgb or tok_rgb@224,tok_caption")
    p.add_argument("--to", dest="targets", required=True, type=_csv,
                   help="comma-separated modalities or token folders to generate, in order (chained), e.g. "
                        "depth,normal,caption")
    p.add_argument("--tokenizers", default=None, help="tokenizers directory: also write decoded outputs "
                   "(images as PNG or .npy, sequences as .txt)")
    p.add_argument("--out", required=True, help="output directory: OUT/<key>/<folder>.npy and OUT/<key>/sample.png")
    g = p.add_argument_group(
        "generation (ml-4m's conventions; its run_generation.py defaults in brackets, its demo sampler's "
        "per-target settings under --target)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="starting temperature; <= 1e-10 is greedy (default: %(default)s) [ml-4m temps 5.0-1.0-1.0]")
    g.add_argument("--temperature-schedule", default="constant", metavar="constant|linear|onex:MIN_T:POWER",
                   help="how the temperature decays over the rounds of an image-like target: constant; linear "
                        "(to 0 with the tokens left); onex:MIN_T:POWER (x^-POWER from the temperature to MIN_T), "
                        "ml-4m's schedules (default: %(default)s) [linear]")
    g.add_argument("--top-k", type=parse_top_k, default=0, metavar="K",
                   help="keep the K most likely tokens (an integer), or that fraction of the vocabulary (a float "
                        "such as 0.1), before top-p; 0: off (default: %(default)s) [0]")
    g.add_argument("--top-p", type=float, default=0.0,
                   help="nucleus: keep the most likely tokens until they hold more than this probability; 0: off "
                        "(default: %(default)s) [0; the demo sampler uses 0.8]")
    g.add_argument("--steps", type=int, default=8,
                   help="MaskGIT / ROAR rounds for image-like targets (default: %(default)s) [25]")
    g.add_argument("--schedule", default=None, choices=SCHEDULES,
                   help="tokens revealed per round: cosine (few, many, few) or linear (equal shares, larger ones "
                        "first); default: cosine for maskgit, linear for random (ml-4m's ROAR is always linear)")
    g.add_argument("--order", default="maskgit", choices=ORDERS,
                   help="maskgit (most confident first) or random (ROAR) (default: %(default)s) [maskgit]")
    g.add_argument("--guidance-scale", "--cfg", dest="guidance_scale", type=float, default=1.0,
                   help="classifier-free guidance: 1 = none, 0 = unconditional, > 1 follows the inputs more "
                        "(default: %(default)s) [4.0]")
    g.add_argument("--guidance-weights", type=folder_weights, default={}, metavar="FOLDER=W,...",
                   help="multi-condition guidance instead of --guidance-scale: uncond + sum of W * (cond_FOLDER - "
                        "uncond), one pass per named condition (inputs or earlier targets)")
    g.add_argument("--no-guidance-grow", dest="guidance_grow", action="store_false",
                   help="the unconditional pass drops only the sample's inputs, not the targets generated before "
                        "[ml-4m default: it drops them too, cfg_grow_conditioning]")
    g.add_argument("--sequence-sampling", default=None, choices=SEQUENCE_SAMPLINGS,
                   help="ml4m: ml-4m's empty sequence (input [S_1]), nothing banned, stop at the closing sentinel; "
                        "omniforge: no input, [PAD] and sentinels banned, stop at [EOS]; default: ml4m for a "
                        "released 4M checkpoint, omniforge for omniforge's own")
    g.add_argument("--target", dest="target_settings", action="append", default=[], metavar="FOLDER:KEY=V,...",
                   help="settings for one target of --to (repeatable); keys: steps, temp, temp_schedule, schedule, "
                        "order, top_k, top_p, cfg, sequence_sampling. ml-4m's demo for rgb -> X: "
                        "tok_depth@224:order=random,steps=1,temp=0.01,cfg=2 and caption:temp=0.3; for X -> rgb: "
                        "tok_rgb@224:order=random,steps=25,temp=3,temp_schedule=onex:0.5:0.5,cfg=2")
    g.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(fn=_sample_cli)


def parse_top_k(value: str) -> int | float:
    """--top-k: "5" is a count, "0.1" a fraction of the vocabulary (ml-4m's int / float rule)."""
    try:
        return int(value)
    except ValueError:
        return float(value)


def folder_weights(value: str) -> dict[str, float]:
    """--guidance-weights FOLDER=W,FOLDER=W -> {folder: w}."""
    out: dict[str, float] = {}
    for item in _csv(value):
        name, eq, weight = item.rpartition("=")
        try:
            out[name.strip()] = float(weight)
        except ValueError:
            name = ""
        if not eq or not name.strip():
            raise ValueError(f"{item!r} is not FOLDER=WEIGHT")
    return out


def _sample_cli(args: Any) -> int:
    from omniforge.model.sample import sample_cli

    return sample_cli(args)


def add_export4m_cli(subparsers: Any) -> None:
    """Register `omniforge export-4m RUN --out DIR` on the top-level subparsers."""
    p = subparsers.add_parser("export-4m", help="write a trained model (released 4M layout) and its tokenizers as "
                              "ml-4m's hub layout: the folders ml-4m's FM.from_pretrained and VQVAE.from_pretrained "
                              "load")
    p.add_argument("run", help="training run directory (uses `latest`) or a checkpoint-<step> directory; the model "
                   "must be in the released layout (trained with --init-from a released 4M checkpoint)")
    p.add_argument("--out", required=True, help="new folder to write: config.json + model.safetensors (the model) "
                   "and tokenizers/<folder>/ (its tokenizers)")
    p.add_argument("--tokenizers", default=None, help="the tokenizers directory the run's token shards were made "
                   "with (default: the run's recorded --tokenizers)")
    p.add_argument("--model-only", action="store_true", help="write the model alone, no tokenizers")
    p.set_defaults(fn=_export4m_cli)


def _export4m_cli(args: Any) -> int:
    from omniforge.model.ml4m import export_4m, export_lines

    exported = export_4m(args.run, args.out, tokenizers=args.tokenizers, model_only=args.model_only)
    for line in export_lines(exported):
        print(line)
    return 0
