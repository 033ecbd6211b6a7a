"""`omniforge demo`: labels, tokenizers, token shards, a few training steps and a sample from real photos,
offline, in minutes on a laptop."""

from __future__ import annotations

import time
from pathlib import Path

from omniforge.jobs.demo_corpus import build_demo_corpus

DEMO_TOKENIZER_EPOCHS = 12
DEMO_TRAIN_STEPS = 150


def demo(out: str, *, ray_address: str | None = None, weights: str = "tiny") -> int:
    from omniforge.labelers import get_labeler_class, labeler_for_modality, list_labelers
    from omniforge.pipeline import LabelConfig, label, parse_weights, show, verify
    from omniforge.shards import load_manifest

    t0 = time.time()
    out_dir = Path(out).resolve()
    corpus = build_demo_corpus(out_dir / "corpus")
    root = str(out_dir / "labels")
    # every labelable modality, by its default teacher: the classical ones for real, the learned ones at their tiny size
    modalities = tuple(dict.fromkeys(m for name in list_labelers() for m in get_labeler_class(name).modalities))
    learned = sorted({labeler_for_modality(m).name for m in modalities if labeler_for_modality(m).learned})
    if weights == "tiny":
        print(f"demo: learned teachers ({', '.join(learned)}) run with RANDOM weights (--weights tiny): their "
              f"features are not meaningful. Run `omniforge demo --weights pretrained` where the model hub is "
              f"reachable for the real teachers. Classical teachers are real.")
    print(f"demo: corpus of real photos (scikit-image samples) at {corpus}")
    cfg = LabelConfig(input=str(corpus), output=root, modalities=modalities, weights=parse_weights(weights),
                      shard_size=4, batch_size=8)
    summary = label(cfg, ray_address=ray_address)
    print("\n".join(summary.lines()))
    report = verify(root)
    print("\n".join(report.lines()))
    manifest = load_manifest(root)
    keys = manifest.column("key").to_pylist()
    uris = manifest.column("source_uri").to_pylist()
    preview_key = next((k for k, u in zip(keys, uris) if u.endswith("astronaut.jpg")), keys[0])
    preview = show(root, preview_key, str(out_dir / "preview.png"))
    print(f"demo: {len(keys)} samples, preview of {preview_key!r} -> {preview}")
    tokens_ok, untokenized = _tokenize(root, out_dir / "tokenizers", modalities, preview_key, out_dir, ray_address)
    kept = tuple(m for m in modalities if m not in untokenized)
    _train_and_sample(root, out_dir / "tokenizers", kept, preview_key, out_dir)
    _export(root, out_dir / "tokenizers", out_dir / "ml4m", untokenized)
    print(f"demo: done in {time.time() - t0:.0f}s; labels and token shards under {root}, the model run under "
          f"{out_dir / 'train'}, the corpus as ml-4m's loader reads it under {out_dir / 'ml4m'}")
    return 0 if report.ok and tokens_ok else 1


def _tokenize(root: str, tokenizers: Path, modalities: tuple[str, ...], key: str, out_dir: Path,
              ray_address: str | None) -> tuple[bool, set[str]]:
    """Train a tiny tokenizer per tokenizable modality on the demo labels, then tokenize them with 2 crops. A
    tokenizer whose labels hold nothing to train on (human_poses when the random-weight detector finds nobody) is
    left out with its reason, and so are the modalities that need it: (verify ok, those modalities)."""
    from omniforge.errors import NothingToTrain
    from omniforge.pipeline import show, verify
    from omniforge.pipeline.tokenize_job import TokenizeConfig, tokenizable, tokenize
    from omniforge.tokenize.crops import CropConfig
    from omniforge.tokenize.kinds import kind_for
    from omniforge.tokenize.train import TokenizerTrainConfig, summary, train_tokenizer

    wanted = tuple(m for m in tokenizable() if m in modalities)
    source = {art.folder: art.trained_by for m in wanted for art in kind_for(m).artifacts}  # folder -> trained from
    names = sorted(source)
    print(f"demo: training {len(names)} tiny tokenizers on the labels ({', '.join(names)}); with 12 photos and "
          f"random-weight teachers the reconstructions are rough: this shows the machinery, not quality")
    untrained = set()
    for name in names:
        cfg = TokenizerTrainConfig(data=root, modality=source[name], out=str(tokenizers), size="tiny",
                                   epochs=DEMO_TOKENIZER_EPOCHS, batch_size=4, vocab_size=8000)
        try:
            print(f"  {summary(cfg, train_tokenizer(cfg, progress=False, verbose=False))}")
        except NothingToTrain as e:
            print(f"  {name} tokenizer: not trained: {e}")
            untrained.add(name)
    untokenized = {m for m in wanted if any(a.folder in untrained for a in kind_for(m).artifacts)}
    if untokenized:
        print(f"demo: {', '.join(sorted(untokenized))} left out of tokenizing, training and the export: no tokenizer")
    wanted = tuple(m for m in wanted if m not in untokenized)
    summary_t = tokenize(TokenizeConfig(input=root, tokenizers=str(tokenizers), modalities=wanted,
                                        crops=CropConfig(n_crops=2)), ray_address=ray_address)
    print("\n".join(summary_t.lines()))
    report = verify(root)
    print(f"demo: verify labels and tokens: {'OK' if report.ok else 'PROBLEMS'}")
    if not report.ok:
        print("\n".join(report.lines()))
    recon = show(root, key, str(out_dir / "reconstruction.png"), tokenizers=str(tokenizers))
    print(f"demo: labels beside their token reconstructions (crop 0) -> {recon}")
    return report.ok, untokenized


def _export(root: str, tokenizers: Path, out: Path, untokenized: set[str]) -> None:
    """The corpus in ml-4m's dialect: sam_instance pre-tokenized, every folder of a shard with the same keys (but
    the folders of modalities left untokenized)."""
    from omniforge.pipeline.export import ExportConfig, export
    from omniforge.pipeline.verify import discover_modalities

    folders = tuple(f for f in discover_modalities(root) if f not in untokenized)
    summary = export(ExportConfig(root=root, out=str(out), tokenizers=str(tokenizers), folders=folders,
                                  progress=False))
    print("\n".join(summary.lines()))


def _train_and_sample(root: str, tokenizers: Path, modalities: tuple[str, ...], key: str, out_dir: Path) -> None:
    """A few tiny training steps on every modality as 4M-21 trains on it (image-like and global token folders,
    raw rgb pixels, T5 caption embeddings, the sequences read raw and serialized per sample, as ml-4m does),
    then one chained sample."""
    from omniforge.model.sample import SampleConfig, sample_key
    from omniforge.model.train import TrainConfig, summary, train
    from omniforge.modalities import all_modalities

    labeled = [m for m in all_modalities() if m.name in modalities]
    folders = tuple(m.pixel_modality for m in labeled if m.pixel_modality) + tuple(
        m.name if m.crop in ("sequence", "embedding") else m.token_modality
        for m in labeled if m.tokenized or m.embedded)
    run = out_dir / "train"
    print(f"demo: {DEMO_TRAIN_STEPS} steps of the tiny 4M model on {len(folders)} folders ({', '.join(folders)}; "
          f"the sequences read from their label folders and serialized per sample, as ml-4m reads them); a demo "
          f"of the loop, not a trained model")
    cfg = TrainConfig(data=root, modalities=folders, out=str(run), tokenizers=str(tokenizers), model="tiny",
                      steps=DEMO_TRAIN_STEPS, batch_size=4, input_tokens=128, target_tokens=128, lr=1e-3,
                      warmup_steps=5, save_every=DEMO_TRAIN_STEPS, shuffle_buffer=16, device="cpu",
                      log_every=10)
    print(f"  {summary(cfg, train(cfg, progress=False))}")
    lines = sample_key(str(run), root, key, ["rgb"], ["depth", "caption"], str(out_dir / "samples"),
                       tokenizers=str(tokenizers), cfg=SampleConfig(temperature=0.7, steps=4))
    print("demo: one sample, depth then caption generated from the rgb pixels (chained):")
    print("\n".join(f"  {line}" for line in lines))
