"""`omniforge tokenizer import-4m SRC... --out DIR`: lay Apple's released tokenizers out as a --tokenizers folder.

A source is a local folder or a hub repository id:

- a snapshot folder itself (`config.json` + `model.safetensors` in ml-4m's hub layout), named like its
  repository (`4M_tokenizers_depth_8k_224-448`, or `EPFL-VILAB--4M_tokenizers_depth_8k_224-448`);
- a folder of such snapshot folders, which may also hold ml-4m's WordPiece vocabulary
  `text_tokenizer_4m_wordpiece_30k.json` (it becomes DIR/text/tokenizer.json, the vocabulary every sequence
  modality shares);
- a Hugging Face cache (`models--EPFL-VILAB--4M_tokenizers_.../snapshots/<revision>/`, or the cache folder
  holding such `models--*` folders);
- a hub id (`EPFL-VILAB/4M_tokenizers_depth_8k_224-448`), downloaded with huggingface_hub when the hub is
  reachable.

Which modality a repository serves is the registry's `ModalityInfo.ml4m_tokenizer`; its folder under DIR is
the modality's tokenizer folder (`TokenizerKind.artifact.folder`: the modality name, `sam_mask` for the SAM
instance tokenizer, `human_poses` for the SMPL pose tokenizer), and one repository may fill several (the edge
tokenizer: canny_edge and sam_edge). Every
snapshot is loaded and checked against its modalities before anything is written; the folders are then
written next to DIR and renamed into place, so a failure leaves DIR as it was. A repository no registered
modality names is reported and skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass

from omniforge.errors import ConfigError, OmniforgeError
from omniforge.modalities import ModalityInfo, all_modalities

WORDPIECE_FILE = "text_tokenizer_4m_wordpiece_30k.json"  # ml-4m's released vocabulary (apple/ml-4m)
_FILES = ("config.json", "model.safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_RES = re.compile(r"_(\d+)(?:-(\d+))?$")  # a release name's resolution suffix: _224-448, _224, _64


@dataclass(frozen=True)
class Snapshot:
    """One tokenizer snapshot found in a source: its repository name (owner stripped) and local folder."""

    name: str
    path: str


@dataclass(frozen=True)
class Imported:
    """One tokenizer folder written (or to be written) under DIR."""

    folder: str
    modalities: tuple[str, ...]
    source: str  # the repository name, or the vocabulary file
    line: str  # what it covers, as printed


def repo_name(folder_name: str) -> str:
    """The repository name of a snapshot folder: `models--EPFL-VILAB--X`, `EPFL-VILAB--X`, `EPFL-VILAB/X` -> X."""
    name = folder_name.rstrip("/").split("/")[-1]
    if name.startswith("models--"):
        name = name[len("models--"):]
    return name.split("--")[-1]


def _is_snapshot(path: str) -> bool:
    from omniforge.tokenize.ml4m import is_snapshot_dir

    return os.path.isdir(path) and is_snapshot_dir(path)


def _cache_snapshot(model_dir: str) -> str | None:
    """The snapshot folder of a hub cache entry `models--owner--name` (refs/main, else its only revision)."""
    snaps = os.path.join(model_dir, "snapshots")
    if not os.path.isdir(snaps):
        return None
    ref = os.path.join(model_dir, "refs", "main")
    if os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            rev = os.path.join(snaps, f.read().strip())
        if os.path.isdir(rev):
            return rev
    revisions = sorted(os.listdir(snaps))
    return os.path.join(snaps, revisions[0]) if len(revisions) == 1 else None


def find_sources(src: str) -> tuple[list[Snapshot], str | None]:
    """Snapshots in one source (a local folder, or a hub id downloaded first), and its WordPiece file if any."""
    if os.path.exists(src):
        return _scan(src)
    if _HUB_ID.match(src):
        if not modalities_for(repo_name(src)):
            raise ConfigError(f"no registered modality uses {src} (ModalityInfo.ml4m_tokenizer): nothing would serve "
                              "its tokens, so it is not downloaded")
        return [Snapshot(repo_name(src), _download(src))], None
    raise ConfigError(f"{src} is neither a local folder nor a hub repository id (owner/name)")


def _scan(src: str) -> tuple[list[Snapshot], str | None]:
    src = os.path.abspath(src)
    if os.path.isfile(src):
        if src.endswith(".json"):  # the vocabulary (text_tokenizer_4m_wordpiece_30k.json, or renamed)
            return [], src
        raise ConfigError(f"{src} is a file, not a tokenizer snapshot folder or the WordPiece vocabulary")
    if _is_snapshot(src):
        return [Snapshot(repo_name(src), src)], None
    cached = _cache_snapshot(src)
    if cached is not None and _is_snapshot(cached):
        return [Snapshot(repo_name(src), cached)], None
    found, vocab = [], None
    for entry in sorted(os.listdir(src)):
        path = os.path.join(src, entry)
        if entry == WORDPIECE_FILE and os.path.isfile(path):
            vocab = path
        elif os.path.isdir(path):
            snap = path if _is_snapshot(path) else _cache_snapshot(path)
            if snap is not None and _is_snapshot(snap):
                found.append(Snapshot(repo_name(entry), snap))
    if not found and vocab is None:
        raise ConfigError(f"{src} holds no ml-4m tokenizer snapshot (a folder with config.json and "
                          f"model.safetensors) and no {WORDPIECE_FILE}")
    return found, vocab


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConfigError(f"downloading {repo_id} needs huggingface_hub: pip install huggingface_hub") from None
    try:
        return snapshot_download(repo_id, allow_patterns=list(_FILES))
    except Exception as e:  # noqa: BLE001 - any hub failure (offline, missing repo, auth) ends in one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot download {repo_id} from the hub ({type(e).__name__}: {first[:200]}): download "
                          f"it where the hub is reachable (`huggingface-cli download {repo_id}`) and pass the "
                          "folder instead") from None


def modalities_for(name: str) -> list[ModalityInfo]:
    """The registered modalities whose released tokenizer is the repository `name` (owner ignored)."""
    return [m for m in all_modalities() if m.ml4m_tokenizer and repo_name(m.ml4m_tokenizer) == name]


def _resolutions(name: str, trained: int) -> str:
    m = _RES.search(name)
    if m is None:
        return f"trained at {trained}"
    lo, hi = m.group(1), m.group(2)
    return f"{lo}-{hi}" if hi else lo


def _describe(snap: Snapshot, model, info: ModalityInfo, tokens: int) -> str:
    c = model.config
    m = _RES.search(snap.name)
    if c.mlp_encoder or m is None or not m.group(2) or info.crop not in ("dense", "features"):
        count = f"{tokens} tokens"
    else:
        big = int(m.group(2)) / int(m.group(1))
        count = f"{tokens}-{round(tokens * big * big)} tokens"
    # an MLP tokenizer of a sequence modality (the pose tokenizer) has no image resolution: its name ends in a count
    where = "" if c.mlp_encoder and info.crop == "sequence" else \
        f"resolution {_resolutions(snap.name, c.trained_side)}, "
    return f"{c.family}, codebook {c.codebook_size}, {count}, {where}decoder: {c.decoder_line}"


def plan(sources: list[str]) -> tuple[list[tuple[Imported, str]], list[str]]:
    """What importing `sources` writes: (Imported, local folder or file to copy) per tokenizer folder, and the
    lines for what was skipped. Every snapshot is loaded and checked against its modalities here."""
    from omniforge.tokenize import ml4m
    from omniforge.tokenize.kinds import kind_for, text_artifact

    todo: list[tuple[Imported, str]] = []
    skipped: list[str] = []
    folders: dict[str, str] = {}
    vocabs = []
    for src in sources:
        snaps, vocab = find_sources(src)
        if vocab is not None:
            vocabs.append(vocab)
        for snap in snaps:
            infos = modalities_for(snap.name)
            if not infos:
                skipped.append(f"skipped {snap.name} ({snap.path}): no registered modality names it as its "
                               "ml4m_tokenizer (omniforge.modalities.ModalityInfo)")
                continue
            try:
                model = ml4m.load_snapshot(snap.path)
            except OmniforgeError as e:
                raise type(e)(f"{snap.name}: {e}") from None
            by_folder: dict[str, list[ModalityInfo]] = {}
            for info in infos:
                kind = kind_for(info)
                ml4m.check_fits(model, info, snap.path, side=kind.ml4m_input_side(), tokens=kind.tokens_per_input)
                by_folder.setdefault(kind.artifact.folder, []).append(info)
            for folder, group in by_folder.items():
                if folder in folders:
                    raise ConfigError(f"{snap.name} and {folders[folder]} both fill {folder}/: import one of them")
                folders[folder] = snap.name
                kind = kind_for(group[0])
                names = tuple(i.name for i in group)
                line = _describe(snap, model, group[0], kind.tokens_per_input)
                todo.append((Imported(folder, names, snap.name, line), snap.path))
    if len(vocabs) > 1:
        raise ConfigError(f"more than one WordPiece vocabulary among the sources ({', '.join(vocabs)}): pass one")
    if vocabs:
        from omniforge.tokenize.text import TextTokenizer

        try:
            tok = TextTokenizer.from_file(vocabs[0])
        except OmniforgeError as e:
            raise ConfigError(f"{vocabs[0]}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own exception types
            raise ConfigError(f"{vocabs[0]} is not a WordPiece tokenizer.json ({e})") from None
        users = [m.name for m in all_modalities() if m.crop == "sequence"]
        line = f"WordPiece vocabulary, {tok.vocab_size} tokens"
        todo.append((Imported(text_artifact().folder, tuple(users), os.path.basename(vocabs[0]), line), vocabs[0]))
    if not todo:
        raise ConfigError("nothing to import: " + "; ".join(skipped) if skipped else "nothing to import")
    return todo, skipped


def import_4m(sources: list[str], out: str, *, link: bool = False, overwrite: bool = False) -> list[Imported]:
    """Lay the tokenizers of `sources` out under `out` (see the module docstring); returns what it wrote.

    link: symlink the weights instead of copying them (the released ones are hundreds of MB each).
    overwrite: replace tokenizer folders that exist already (otherwise that is an error, before any write)."""
    from omniforge import storage

    if storage.is_s3(out):
        raise ConfigError(f"import-4m writes a local folder, not {out}: import locally, then copy the folder")
    todo, skipped = plan(sources)
    for line in skipped:
        print(line)
    out = os.path.abspath(out)
    existing = [imp.folder for imp, _ in todo if os.path.exists(os.path.join(out, imp.folder))]
    if existing and not overwrite:
        raise ConfigError(f"{', '.join(os.path.join(out, f) for f in existing)} already exist: remove them or pass "
                          "--overwrite")
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".import-4m-", dir=out)
    try:
        for imp, src in todo:
            dest = os.path.join(staging, imp.folder)
            os.makedirs(dest)
            if os.path.isfile(src):  # the vocabulary
                shutil.copyfile(src, os.path.join(dest, "tokenizer.json"))
                continue
            for name in _FILES:
                source = os.path.realpath(os.path.join(src, name))
                if link:
                    os.symlink(source, os.path.join(dest, name))
                else:
                    shutil.copyfile(source, os.path.join(dest, name))
        for imp, _ in todo:  # every file is in place: move the folders in
            final = os.path.join(out, imp.folder)
            if os.path.exists(final):
                old = os.path.join(staging, f".old-{imp.folder}")
                os.replace(final, old)
            os.replace(os.path.join(staging, imp.folder), final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [imp for imp, _ in todo]


def cmd_import_4m(args) -> int:
    written = import_4m(args.sources, args.out, link=args.link, overwrite=args.overwrite)
    width = max(len(i.folder) for i in written)
    for imp in written:
        serves = "" if imp.modalities == (imp.folder,) else f" (for {', '.join(imp.modalities)})"
        print(f"{imp.folder:<{width}}  <- {imp.source}: {imp.line}{serves}")
    print(f"{len(written)} tokenizer folder{'s' if len(written) != 1 else ''} in {os.path.abspath(args.out)}: pass "
          f"--tokenizers {args.out} to omniforge tokenize")
    return 0


__all__ = ["Imported", "Snapshot", "WORDPIECE_FILE", "find_sources", "import_4m", "modalities_for", "plan",
           "repo_name"]
