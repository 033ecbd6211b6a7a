"""The `omniforge` command line. Every command maps to a Python function of the same name."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from omniforge.errors import OmniforgeError
from omniforge.modalities import DEFAULT_LABEL_MODALITIES
from omniforge.model._cli import add_export4m_cli, add_sample_cli, add_train_cli
from omniforge.tokenize._cli import add_cli as add_tokenizer_cli

DEFAULT_MODALITIES = ",".join(DEFAULT_LABEL_MODALITIES)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", default="auto", choices=["auto", "folder", "wds", "parquet"],
                   help="corpus format (default: detected from the input)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-column", help="parquet: column with image bytes")
    p.add_argument("--path-column", help="parquet: column with image paths")
    p.add_argument("--caption-column", help="parquet: column with captions")
    p.add_argument("--key-column", help="parquet: column with sample keys")
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local "
                   "cluster)")


def _plan_config(args: argparse.Namespace, output: str):
    from omniforge.pipeline import PlanConfig

    return PlanConfig(input=args.input, output=output, shard_size=args.shard_size, format=args.format,
                      image_column=args.image_column, caption_column=args.caption_column,
                      key_column=args.key_column, path_column=args.path_column)


def cmd_plan(args: argparse.Namespace) -> int:
    from omniforge.pipeline import plan

    table = plan(_plan_config(args, args.output), ray_address=args.ray_address)
    n_shards = max(table.column("shard").to_pylist(), default=-1) + 1
    print(f"planned {table.num_rows} samples in {n_shards} shards -> {args.output}/manifest/corpus.parquet")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from omniforge.pipeline import LabelConfig, label, parse_options, parse_teachers, parse_weights, plan
    from omniforge.pipeline.teachers import resolve_teachers

    cfg = LabelConfig(output=args.output, modalities=_csv(args.modalities), weights=parse_weights(args.weights or ""),
                      options=parse_options(args.option), teachers=parse_teachers(args.teacher), profile=args.profile,
                      storage_size=args.storage_size, max_pixels=args.max_pixels, batch_size=args.batch_size,
                      shard_size=args.shard_size, format=args.format, actors_per_teacher=args.actors_per_teacher,
                      cpus_per_actor=args.cpus_per_actor, device=args.device, progress=not args.no_progress)
    # bad teachers, options and weights fail here, on the driver, before any scanning or Ray work
    resolve_teachers(cfg.modalities, cfg.weights, cfg.options, teachers=cfg.teachers, profile=cfg.profile)
    if args.input:
        plan(_plan_config(args, args.output), ray_address=args.ray_address, progress_bar=not args.no_progress)
    summary = label(cfg, ray_address=args.ray_address)
    print("\n".join(summary.lines()))
    return 0


def cmd_tokenize(args: argparse.Namespace) -> int:
    from omniforge.pipeline import parse_options, parse_teachers, parse_weights
    from omniforge.pipeline.tokenize_job import TokenizeConfig, parse_crops, tokenize

    cfg = TokenizeConfig(input=args.input, output=args.output, tokenizers=args.tokenizers,
                         modalities=_csv(args.modalities), crops=parse_crops(args.crops, seed=args.seed),
                         weights=parse_weights(args.weights or ""), options=parse_options(args.option),
                         teachers=parse_teachers(args.teacher), profile=args.profile,
                         batch_size=args.batch_size, actors=args.actors, device=args.device,
                         progress=not args.no_progress)
    summary = tokenize(cfg, ray_address=args.ray_address)
    print("\n".join(summary.lines()))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from omniforge.pipeline import verify

    report = verify(args.root, list(_csv(args.modalities)) if args.modalities else None, decode=not args.no_decode)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def cmd_export(args: argparse.Namespace) -> int:
    from omniforge.pipeline.export import ExportConfig, export

    summary = export(ExportConfig(root=args.root, out=args.out, dialect=args.dialect, tokenizers=args.tokenizers,
                                  folders=_csv(args.modalities) if args.modalities else None, copy=args.copy,
                                  progress=not args.no_progress))
    print("\n".join(summary.lines()))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from omniforge.pipeline import parse_options, show

    out = show(args.root, args.key, args.out, list(_csv(args.modalities)) if args.modalities else None,
               tokenizers=args.tokenizers, options=parse_options(args.option), note=print)
    print(f"wrote {out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from omniforge.errors import ConfigError
    from omniforge.labelers import get_labeler_class, list_labelers, list_profiles
    from omniforge.modalities import all_modalities

    if args.profile is not None:
        if args.teacher:
            raise ConfigError("give a teacher or --profile, not both: `omniforge list TEACHER` shows a teacher's "
                              "options, `omniforge list --profile NAME` a profile's teachers")
        print("\n".join(_profile_lines(args.profile)))
        return 0
    if args.dialect is not None:
        print("\n".join(_dialect_lines()))
        return 0
    if args.teacher:
        print("\n".join(_teacher_lines(get_labeler_class(args.teacher))))
        return 0
    print(f"{'labeler':<15} {'kind':<9} modalities")
    for name in list_labelers():
        cls = get_labeler_class(name)
        print(f"{name:<15} {'learned' if cls.learned else 'classical':<9} "
              f"{', '.join(_modality_mark(m, cls) for m in cls.modalities)}")
    labelable = {m for n in list_labelers() for m in get_labeler_class(n).modalities}
    print(f"\n{'modality':<17} {'file':<10} {'tokens':<25} {'tokenizer':<13} format")
    for m in all_modalities():
        mark = "" if m.name in labelable else "  (no labeler yet)"
        tokens = f"{m.token_modality} ({m.num_tokens})" if m.tokenized else "(no tokens)"
        if m.embedded:
            tokens = f"input vectors ({m.shape[0]})"
        print(f"{m.name:<17} <key>.{m.ext:<4} {tokens:<25} {m.tokenizer:<13} {m.description}{mark}")
        for v in list(m.sizes())[1:]:  # the other token sizes (4M-21's tok_*@448), one line each
            tokens = f"{v.token_modality} ({v.num_tokens})"
            pixels = f", pixel input {v.pixel_modality}" if v.pixel_modality else ""
            print(f"{'':<17} {'':<10} {tokens:<25} {m.tokenizer:<13} the same crops at {v.token_size} x "
                  f"{v.token_size}{pixels}: `omniforge tokenize --modalities {m.name}@{v.token_size}`")
    print("\n`omniforge list TEACHER` shows a teacher's options; where a modality has several teachers, "
          "--teacher MODALITY=TEACHER chooses another than its default; `omniforge list --profile NAME` shows a "
          f"teacher profile ({', '.join(list_profiles())})")
    return 0


def _dialect_lines() -> list[str]:
    """Per label folder: how ml-4m's loader gets it (the registry's ml4m field) and what differs."""
    from omniforge.modalities import all_modalities

    how = {"direct": "reads it as is", "export": "export --dialect ml4m", "none": "not in ml-4m's form"}
    lines = [f"{'folder':<21} {'ml-4m':<22} notes"]
    for m in all_modalities():
        lines.append(f"{m.name:<21} {how[m.ml4m]:<22} {m.ml4m_note or '-'}")
    lines.append(f"{'tok_*, crop_settings':<21} {how['direct']:<22} int16 (n_crops, N) token ids; int32 (n_crops, 5) "
                 "crops (top, left, h, w, hflip)")
    return lines


def _modality_mark(modality: str, cls: type) -> str:
    """A modality a teacher writes, marked when the modality has several teachers: its default, or not."""
    from omniforge.errors import ConfigError
    from omniforge.labelers import labeler_for_modality, labelers_for_modality

    if len(labelers_for_modality(modality)) < 2:
        return modality
    try:
        default = labeler_for_modality(modality).name
    except ConfigError:  # several teachers, none claiming it: every job must choose
        return f"{modality} (--teacher {modality}={cls.name}; no default)"
    return f"{modality} (default)" if default == cls.name else f"{modality} (--teacher {modality}={cls.name})"


def _profile_lines(profile: str) -> list[str]:
    """`omniforge list --profile NAME`: one line per labelable modality: its teacher in the profile, the
    weights and options it runs with, what the profile's model family used, and STAND-IN with the reason where
    omniforge's teacher is not that one."""
    import json

    from omniforge.pipeline.teachers import profile_rows

    cells = []
    for row in profile_rows(profile):
        if row.teacher is None or row.entry is None:
            cells.append((row.modality, "-", "-", f"-  |  not in profile {profile}: leave it out, or label it outside "
                          f"the profile with --teacher {row.modality}=NAME"))
            continue
        options = " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}"
                           for k, v in row.entry.options.items()) or "-"
        text = f"{options}  |  {row.entry.reference}"
        if row.entry.stand_in:
            text += f"  |  STAND-IN: {row.entry.stand_in}"
        cells.append((row.modality, row.teacher.name, row.entry.weights if row.teacher.learned else "-", text))
    header = ("modality", "teacher", "weights", f"options  |  reference ({profile})  |  STAND-IN: why omniforge's "
              f"teacher differs")
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(3)]
    lines = ["  ".join(c[i].ljust(widths[i]) for i in range(3)) + "  " + c[3] for c in [header, *cells]]
    lines.append(f"\n`omniforge label --profile {profile}` runs these teachers; --teacher, --weights and --option "
                 f"given with it override the profile")
    return lines


def _teacher_lines(cls: type) -> list[str]:
    """`omniforge list TEACHER`: the docstring's summary, what it writes and reads, and its options."""
    import json

    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    lines = [" ".join(doc.split()) or cls.name]
    lines.append(f"  modalities: {', '.join(_modality_mark(m, cls) for m in cls.modalities)}")
    kind = ("learned (an actor pool, a GPU each when the cluster has them; --weights "
            f"{cls.name}=tiny|pretrained|/path/to/checkpoint)" if cls.learned else "classical (CPU tasks, no weights)")
    lines.append(f"  kind: {kind}")
    if cls.requires or cls.optional_inputs:
        lines.append(f"  reads: {', '.join(cls.requires) or '-'} (required), {', '.join(cls.optional_inputs) or '-'} "
                     f"(when present)")
    options = cls.options_type()
    if options is None:
        lines.append("  options: not declared (a labeler without an options class: see its documentation)")
        return lines
    docs = options.describe()
    if not docs:
        lines.append("  options: none")
        return lines
    lines.append(f"  options (--option {cls.name}.KEY=VALUE, VALUE as JSON):")
    width = max(len(d.name) for d in docs)
    type_width = max(len(d.type) for d in docs)
    for d in docs:
        lines.append(f"    {d.name:<{width}}  {d.type:<{type_width}}  default {json.dumps(d.default)}: {d.help} "
                     f"({d.valid})")
    return lines


def cmd_train(args: argparse.Namespace) -> int:
    """`omniforge train`: in this process (or under torchrun), or on a Ray cluster with --ray-workers."""
    from omniforge.model.train import cmd_train as train_here

    if args.ray_workers is None:
        if args.ray_address is not None:
            raise OmniforgeError("--ray-address needs --ray-workers N: say how many Ray Train workers to start")
        return train_here(args)
    from omniforge.model.train import config_from_args, summary
    from omniforge.pipeline.train_job import train_on_ray

    cfg = config_from_args(args)
    result = train_on_ray(cfg, workers=args.ray_workers, ray_address=args.ray_address,
                          max_failures=args.ray_max_failures, progress=not args.no_progress)
    if os.path.isdir(cfg.out):
        print(summary(cfg, result))
    else:  # --out is on the disk of rank 0's node, not this one's
        print(f"trained {cfg.model_label} to step {result.steps} on {args.ray_workers} Ray workers; the run is in "
              f"{cfg.out} on the node of rank 0")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from omniforge.jobs.demo import demo

    return demo(args.out, ray_address=args.ray_address, weights=args.weights)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniforge", description="Pseudo-label image corpora for 4M-21-style "
                                     "any-to-any models, on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="stable keys and the shard plan (manifest/corpus.parquet)")
    p.add_argument("--input", required=True, help="corpus: folder, webdataset tar(s) or parquet; local or s3://")
    p.add_argument("--output", required=True, help="corpus root for every output (local or s3://)")
    _add_corpus_args(p)
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("label", help="run teachers and write aligned label shards")
    p.add_argument("--input", help="corpus to plan first (not needed when --output is planned already)")
    p.add_argument("--output", required=True, help="corpus root (local or s3://)")
    p.add_argument("--modalities", default=DEFAULT_MODALITIES, help=f"comma list (default {DEFAULT_MODALITIES})")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="teacher profile: every modality's teacher, weights and options as a model family was "
                        "labeled (4m21: 4M-21's teachers; `omniforge list --profile 4m21`); --teacher, --weights "
                        "and --option given here override it")
    p.add_argument("--weights", default=None, help="tiny | pretrained, plus "
                   "TEACHER=tiny|pretrained|/path/to/checkpoint overrides, comma separated (default tiny: random "
                   "weights; with --profile, the profile's)")
    p.add_argument("--option", action="append", default=[], metavar="TEACHER.KEY=VALUE",
                   help="teacher option, e.g. clip.pretrained_tag=laion2b_s34b_b88k (repeatable; `omniforge list "
                        "TEACHER` lists them)")
    p.add_argument("--teacher", action="append", default=[], metavar="MODALITY=TEACHER",
                   help="the teacher of a modality that has several, e.g. depth=omnidata (default: the modality's "
                        "default teacher, or the profile's; repeatable or comma separated)")
    p.add_argument("--storage-size", type=int, default=512, help="shorter side of stored images (default 512)")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="pixel limit against decompression bombs")
    p.add_argument("--batch-size", type=int, default=16, help="samples per teacher batch (default 16)")
    p.add_argument("--actors-per-teacher", type=int, default=None, help="actor pool size per learned teacher "
                   "(default: the cluster's GPUs shared across teachers, else 1)")
    p.add_argument("--cpus-per-actor", type=float, default=None,
                   help="CPUs (and torch threads) per teacher actor (default: on CPU, the learned teachers share the "
                        "node's CPUs less those the decode and write tasks need; on GPU, 1)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_corpus_args(p)
    p.set_defaults(fn=cmd_label)

    p = sub.add_parser("tokenize", help="crop and tokenize label shards into 4M token shards")
    p.add_argument("--input", required=True, help="label root (local or s3://)")
    p.add_argument("--output", default=None, help="token root (default: the label root, beside the labels)")
    p.add_argument("--modalities", required=True,
                   help="comma list of label modalities, e.g. depth,normal,caption,det; <modality>@448 adds its 448 "
                        "tokens (tok_<modality>@448, 784 a crop, the same crops), e.g. rgb,rgb@448 (`omniforge list` "
                        "shows the sizes; labels must be stored large enough: `omniforge label --storage-size`)")
    p.add_argument("--tokenizers", required=True,
                   help="folder of trained tokenizers (`omniforge tokenizer train --out`)")
    p.add_argument("--crops", type=int, default=1,
                   help="crops per sample: crop 0 centred, the others random (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random crops (default 0)")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="feature teachers for crops 1.. from a teacher profile (as `omniforge label --profile`; must "
                        "match the label job)")
    p.add_argument("--weights", default=None, help="feature teachers for crops 1.. (as `omniforge label --weights`; "
                   "must match the label job; default tiny, or the profile's)")
    p.add_argument("--option", action="append", default=[], metavar="TEACHER.KEY=VALUE",
                   help="feature teacher option, as for `omniforge label` (repeatable)")
    p.add_argument("--teacher", action="append", default=[], metavar="MODALITY=TEACHER",
                   help="feature teacher for crops 1.., as for `omniforge label` (must match the label job)")
    p.add_argument("--batch-size", type=int, default=32, help="samples per tokenizer batch (default 32)")
    p.add_argument("--actors", type=int, default=None, help="shard workers (default: one per GPU, else CPUs / 2)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local "
                   "cluster)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_tokenize)

    add_tokenizer_cli(sub)
    p = add_train_cli(sub)
    p.add_argument("--ray-workers", type=int, default=None, metavar="N",
                   help="train on a Ray cluster with N Ray Train workers (a GPU each when the cluster has GPUs) "
                        "instead of in this process")
    p.add_argument("--ray-address", default=None,
                   help="with --ray-workers: the Ray cluster (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--ray-max-failures", type=int, default=3,
                   help="with --ray-workers: worker-group restarts (each resumes from the last checkpoint)")
    p.set_defaults(fn=cmd_train)
    add_sample_cli(sub)
    add_export4m_cli(sub)

    p = sub.add_parser("verify", help="check that every sample is accounted for; exit 1 on any problem")
    p.add_argument("root")
    p.add_argument("--modalities", help="comma list (default: every modality found)")
    p.add_argument("--no-decode", action="store_true", help="skip decoding every member (faster)")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("export", help="write the corpus as another codebase's loader reads it (ml-4m)")
    p.add_argument("root", help="corpus root (labels, tokens, crop_settings)")
    p.add_argument("out", help="new root to write (local or s3://)")
    p.add_argument("--dialect", required=True, choices=["ml4m"], help="ml4m: apple/ml-4m's webdataset loader")
    p.add_argument("--tokenizers", default=None, help="tokenizers directory: the SAM-mask tokenizer that "
                   "sam_instance is exported with (ml-4m reads it pre-tokenized)")
    p.add_argument("--modalities", help="comma list of folders (default: every folder with committed shards)")
    p.add_argument("--copy", action="store_true", help="copy tars instead of symlinking them (S3: always copied)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("show", help="draw every modality of one sample into a PNG")
    p.add_argument("root")
    p.add_argument("--key", required=True)
    p.add_argument("--out", required=True, help="PNG file to write (local or s3://)")
    p.add_argument("--modalities", help="comma list (default: every modality found)")
    p.add_argument("--tokenizers", default=None, help="folder of trained tokenizers: also draw each token "
                   "modality decoded back (a reconstruction beside its label)")
    p.add_argument("--option", action="append", default=[], metavar="TEACHER.KEY=VALUE",
                   help="human_poses.smpl_model=PATH: the SMPL body model (SMPL_NEUTRAL.pkl, licensed separately) "
                        "with which each person is drawn as their projected 3D joints, not only a box")
    p.set_defaults(fn=cmd_show)

    p = sub.add_parser("list", help="registered labelers and modalities with their formats, one teacher's options, or "
                                    "a teacher profile")
    p.add_argument("teacher", nargs="?", help="a teacher: print its summary, modalities and options with defaults")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help="print a teacher profile (e.g. 4m21): per modality its teacher, weights, options, the "
                        "reference it reproduces, and STAND-IN with the reason where omniforge's teacher differs")
    p.add_argument("--dialect", default=None, choices=["ml4m"],
                   help="print how another codebase's loader reads each folder (ml4m: apple/ml-4m)")
    p.set_defaults(fn=cmd_list)

    p = sub.add_parser("demo", help="label a small corpus of real photos end to end, verify it, draw a preview")
    p.add_argument("--out", default="demo_out", help="output folder (default ./demo_out)")
    p.add_argument("--weights", default="tiny", help="tiny (random weights, offline) or pretrained (needs the hub)")
    p.add_argument("--ray-address", default=None)
    p.set_defaults(fn=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except OmniforgeError as e:
        print(f"omniforge {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"omniforge {args.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
