"""Released 4M / 4M-21 checkpoints: ml-4m's hub layout loaded into omniforge's FourM (logits equal to ml-4m's FM
on the fixtures' batch), its config refused field by field, fine-tuning with --init-from, and the export back."""

import json
import os
import shutil

import numpy as np
import pytest
import torch

from omniforge.errors import ConfigError, WeightsError
from omniforge.model.fm import FourM, ModelConfig
from omniforge.model.ml4m import export_released, is_released, key_map, load_released, read_released
from omniforge.model.specs import patchify

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures", "ml4m_fm")
CONFIGS = ("swiglu", "gelu", "t5", "chain")  # chain: the README's tiny 4M-21 over the tokenizer fixtures' modalities
SEQUENCES = ("caption", "det")


def _batch(name: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The fixture batch in omniforge's format (rgb@224 as uint8 patches), restricted to the domains of the
    fixture model ``name`` (the t5 model's t5_caption rows rebuilt from their valid vectors; the chain model has
    its own batch file)."""
    own = os.path.join(FIXTURES, name or "", "batch.npz")
    data = np.load(own if name and os.path.isfile(own) else os.path.join(FIXTURES, "batch.npz"))
    batch: dict[str, dict[str, torch.Tensor]] = {}
    for key in data.files:
        mod, field = key.split("/")
        value = data[key]
        if mod == "rgb@224" and field == "tensor":
            value = np.stack([patchify(image, 16) for image in value])
        elif field == "tensor":
            value = value.astype(np.int64)
        batch.setdefault(mod, {})[field] = torch.from_numpy(value)
    if name is None:
        return batch
    config = _config(name)
    if "t5_caption" in config["domains_in"]:
        t5 = np.load(os.path.join(FIXTURES, name, "t5_caption.npz"))
        tensor = np.zeros((3, 77, 4096), np.float16)
        input_mask = np.ones((3, 77), bool)
        start = 0
        for b, n in enumerate(t5["counts"]):
            tensor[b, :n] = t5["vectors"][start:start + n]
            input_mask[b, :n] = False
            start += n
        batch["t5_caption"] = {"tensor": torch.from_numpy(tensor), "input_mask": torch.from_numpy(input_mask),
                               "target_mask": torch.ones(3, 77, dtype=torch.bool)}
    return {m: d for m, d in batch.items() if m in config["domains_in"] or m in config["domains_out"]}


def _expected(name: str):
    return np.load(os.path.join(FIXTURES, name, "logits.npz"))


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_equal_ml4m(name):
    torch.manual_seed(0)
    loaded = load_released(os.path.join(FIXTURES, name))
    model = loaded.model
    expected = _expected(name)
    batch = _batch(name)
    with torch.no_grad():
        logits = model.decoder_logits(batch, scatter=True)
        _, losses, per_token = model(batch, token_losses=True)
    targets = [k.split("/", 1)[1] for k in expected.files if k.startswith("logits/")]
    assert sorted(targets) == sorted(logits) == sorted(_config(name)["domains_out"])
    worst = 0.0
    for mod in targets:
        index, want = expected[f"index/{mod}"], expected[f"logits/{mod}"]
        assert len(index) > 0
        got = logits[mod][index[:, 0], index[:, 1]].numpy()
        worst = max(worst, float(np.abs(got - want).max()))
        # the same tokens are predicted (one per ml-4m logit row), with ml-4m's per-modality loss
        assert len(per_token[mod][0]) == len(index), mod
        assert losses[mod].item() == pytest.approx(float(expected[f"loss/{mod}"]), abs=1e-4)
    assert worst < 1e-4, worst
    # ml-4m's sequence convention: the first target token of a sequence is given, never predicted
    for mod in [m for m in SEQUENCES if m in targets]:
        first = [int(np.flatnonzero(~batch[mod]["target_mask"][b].numpy())[0])
                 for b in range(3) if (~batch[mod]["target_mask"][b]).any()]
        predicted = {(int(b), int(p)) for b, p in expected[f"index/{mod}"]}
        rows = [b for b in range(3) if (~batch[mod]["target_mask"][b]).any()]
        assert all((b, p) not in predicted for b, p in zip(rows, first))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_ml4m_key_is_mapped(name):
    from safetensors import safe_open

    path = os.path.join(FIXTURES, name)
    released = read_released(path)
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    entries = key_map(released.config, released.specs, released.names, released.domains_in, released.domains_out)
    assert keys <= set(entries)
    assert {k for k, e in entries.items() if not e.optional} <= keys
    loaded = load_released(path)
    state = loaded.model.state_dict()
    copied = {e.omni for k, e in entries.items() if e.rule == "copy" and k in keys}
    # every omniforge parameter comes from the file, but the target-only tok_depth@224's encoder side
    params = {k for k, _ in loaded.model.named_parameters()}
    assert params - copied == set(loaded.fresh)
    assert bool(loaded.fresh) == (name in ("swiglu", "gelu")) and all("tok_depth@224" in k for k in loaded.fresh)
    # the key map moved real values: perturbed biases and LayerNorm weights, modality embeddings
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, "model.safetensors"))
    tok = "tok_rgb@224" if "tok_rgb@224" in released.specs else "tok_depth@224"
    for ml, omni in [("decoder_norm.weight", "decoder_norm.weight"),
                     ("decoder_proj_context.bias", "context_proj.bias"),
                     (f"decoder_embeddings.{tok}.mod_emb", f"decoder_modality_embeddings.{tok}"
                      if released.config.separate_modality_embeddings else f"modality_embeddings.{tok}")]:
        assert weights[ml].std() > 0
        assert torch.equal(state[omni], weights[ml].reshape(state[omni].shape))
    if name == "swiglu":
        assert released.config.swiglu and not released.config.bias
        assert torch.equal(state["encoder.0.mlp.gate.weight"], weights["encoder.0.mlp.fc1.weight"])
        assert torch.equal(state["encoder.0.mlp.fc1.weight"], weights["encoder.0.mlp.fc3.weight"])
        assert torch.equal(state["encoder_positions.tok_dinov2_global"],
                           weights["encoder_embeddings.tok_dinov2_global.pos_emb"][0])
        assert not torch.equal(state["encoder_positions.tok_dinov2_global"],
                               state["decoder_positions.tok_dinov2_global"])
    elif name == "t5":  # T5-XXL caption embeddings: a projection with a bias
        assert torch.equal(state["encoder_tokens.t5_caption.proj.bias"],
                           weights["encoder_embeddings.t5_caption.emb_proj.bias"])
    elif name == "chain":  # the tokenizer fixtures' codebooks; a 448 domain at its own grid
        assert {m: s.vocab_size for m, s in released.specs.items() if s.vocab_size} == {
            "tok_depth@224": 256, "tok_semseg@224": 256, "tok_clip@224": 256, "tok_dinov2_global": 128,
            "tok_depth@448": 256}
        assert released.specs["tok_depth@448"].num_tokens == 784 and released.specs["tok_depth@448"].grid == 28
    else:  # 4M-7's shared modality embeddings, written once under the decoder's name
        assert not released.config.separate_modality_embeddings and released.config.bias
        assert "encoder_embeddings.caption.mod_emb" not in keys


def test_specs_and_roles_come_from_the_checkpoint():
    released = read_released(os.path.join(FIXTURES, "swiglu"))
    specs = released.specs
    assert specs["rgb@224"].kind == "pixels" and specs["rgb@224"].role == "input"
    assert specs["tok_depth@224"].role == "target" and specs["tok_rgb@224"].role == "both"
    assert specs["tok_dinov2_global"].kind == "global" and specs["caption"].kind == "sequence"
    assert {m: s.vocab_size for m, s in specs.items() if s.vocab_size} == {
        "tok_rgb@224": 64, "tok_dinov2_global": 32, "caption": 100, "det": 100, "tok_depth@224": 48}
    assert is_released(os.path.join(FIXTURES, "swiglu")) and not is_released(FIXTURES)


def _config(name="swiglu"):
    with open(os.path.join(FIXTURES, name, "config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("field, value", [("qk_norm", True), ("num_register_tokens", 4), ("mlp_bias", True),
                                          ("decoder_causal_mask", True), ("act_layer", "ReLU"), ("image_size", 448),
                                          ("drop_path_rate_encoder", 0.1), ("some_new_field", 1)])
def test_an_unsupported_config_field_is_refused_in_one_line(tmp_path, field, value):
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "swiglu"), folder)
    config = {**_config(), field: value}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as e:
        load_released(str(folder))
    message = str(e.value)
    assert "\n" not in message and field in message


def test_an_unknown_domain_and_a_bad_shape_are_clear_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "swiglu"), folder)
    (folder / "config.json").write_text(json.dumps({**_config(), "domains_in": ["tok_nothing@224"]}))
    with pytest.raises(ConfigError, match="ml-4m modality 'tok_nothing@224' has no omniforge folder"):
        read_released(str(folder))
    shutil.copy(os.path.join(FIXTURES, "swiglu", "config.json"), folder / "config.json")
    weights = load_file(str(folder / "model.safetensors"))
    weights["encoder.0.attn.qkv.weight"] = weights["encoder.0.attn.qkv.weight"][:-1]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"encoder\.0\.attn\.qkv\.weight has shape \(59, 20\)"):
        load_released(str(folder))
    weights = load_file(os.path.join(FIXTURES, "swiglu", "model.safetensors"))
    weights["register_tokens"] = torch.zeros(1, 2, 20)
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="register_tokens"):
        load_released(str(folder))


def test_default_config_keeps_omniforge_layout():
    """The new switches are off by default: the state dict keys of a default model are what they were."""
    from omniforge.model.specs import specs_for

    specs = specs_for(["tok_rgb@224", "tok_caption", "tok_dinov2_global"], 300)
    model = FourM(ModelConfig(dim=16, encoder_depth=1, decoder_depth=1, heads=2), specs)
    keys = set(model.state_dict())
    assert not any(k.startswith(("decoder_modality_embeddings", "encoder_positions", "decoder_positions"))
                   for k in keys)
    assert "context_proj.bias" in keys and ModelConfig.from_dict(
        {"dim": 16, "encoder_depth": 1, "decoder_depth": 1, "heads": 2}).sequence_decoding == "mask_first"


@pytest.mark.parametrize("name", CONFIGS)
def test_export_round_trips_through_the_loader(tmp_path, name):
    loaded = load_released(os.path.join(FIXTURES, name))
    out = tmp_path / "export"
    config = export_released(loaded.model, str(out))
    assert config == {**_config(name), **{k: v for k, v in config.items() if k not in _config(name)}}
    from safetensors import safe_open

    with safe_open(os.path.join(FIXTURES, name, "model.safetensors"), "pt") as f, \
            safe_open(str(out / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
        for k in f.keys():  # the same tensors, but the unused image decoder tables (written as zeros)
            if not (k.startswith("decoder_embeddings.tok_") and k.endswith("token_emb.weight")):
                # omniforge's sin-cos tables are computed in float64, ml-4m's in float32
                assert torch.allclose(f.get_tensor(k), g.get_tensor(k), atol=1e-4 if "pos_emb" in k else 0), k
    again = load_released(str(out))
    batch = _batch(name)
    with torch.no_grad():
        a = loaded.model.decoder_logits(batch, scatter=True)
        b = again.model.decoder_logits(batch, scatter=True)
    assert all(torch.equal(a[m], b[m]) for m in a)


def test_export_refuses_the_default_layout(tmp_path):
    from omniforge.model.specs import specs_for

    model = FourM(ModelConfig(dim=16, encoder_depth=1, decoder_depth=1, heads=2),
                  specs_for(["tok_rgb@224", "caption"], 300))
    with pytest.raises(ConfigError) as e:
        export_released(model, str(tmp_path / "out"))
    assert "ModelConfig.sequence_decoding='mask_first'" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# Fine-tuning: omniforge train --init-from

RGB, GLOBAL, NORMAL = "tok_rgb@224", "tok_dinov2_global", "tok_normal@224"  # NORMAL: not in the checkpoint


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A token root whose targets are predictable: the same ids (a function of the position) in every sample."""
    import io

    from omniforge import shards

    root = str(tmp_path_factory.mktemp("ft") / "tokens")
    rows = {RGB: np.arange(196) % 16, GLOBAL: np.arange(16) % 8, NORMAL: (np.arange(196) * 3) % 50}
    for s in range(2):
        keys = [f"s{s}-k{k}" for k in range(6)]
        for folder, row in rows.items():
            members = []
            for key in keys:
                buf = io.BytesIO()
                np.save(buf, np.tile(row, (2, 1)).astype(np.int16))
                members.append((f"{key}.npy", buf.getvalue()))
            shards.write_tar(shards.tar_uri(root, folder, s), members)
            shards.write_status(shards.status_uri(root, folder, s), [{"key": k, "ok": True} for k in keys])
    return root


def _ft_cfg(root, out, **kw):
    from omniforge.model.train import TrainConfig

    base = dict(data=root, modalities=(RGB, GLOBAL, NORMAL), out=str(out), input_tokens=32, target_tokens=32,
                batch_size=4, lr=3e-3, warmup_steps=2, final_lr=3e-4, steps=40, save_every=1000, shuffle_buffer=4,
                tensorboard=False, device="cpu", init_from=os.path.join(FIXTURES, "swiglu"))
    return TrainConfig(**{**base, **kw})


def test_init_from_a_released_checkpoint_fine_tunes(corpus, tmp_path, capsys):
    from omniforge.model.checkpoint import load_model
    from omniforge.model.train import main

    torch.set_num_threads(1)
    out = tmp_path / "run"
    argv = ["--data", corpus, "--modalities", ",".join((RGB, GLOBAL, NORMAL)), "--out", str(out),
            "--init-from", os.path.join(FIXTURES, "swiglu"), "--input-tokens", "32", "--target-tokens", "32",
            "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "2", "--final-lr", "3e-4", "--steps", "40",
            "--save-every", "1000", "--shuffle-buffer", "4", "--device", "cpu", "--no-tensorboard", "--no-progress"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    for folder in ("rgb@224", "caption", "det", "tok_depth@224"):
        assert f"dropped {folder}: in the checkpoint, not in --modalities" in err
    assert f"added {NORMAL}: not in the checkpoint, fresh embeddings and head" in err
    assert "ml-4m hub checkpoint" in err and f"loaded {RGB}, {GLOBAL}" in err
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 40
    first, last = np.mean([e["loss"] for e in log[:5]]), np.mean([e["loss"] for e in log[-5:]])
    assert last < 0.75 * first, (first, last)
    for m in (RGB, GLOBAL, NORMAL):  # the added modality learns as well as the loaded ones
        assert np.mean([e["losses"][m] for e in log[-5:]]) < np.mean([e["losses"][m] for e in log[:5]]), m
    # the run's checkpoint is in the released layout, with the checkpoint's vocabularies
    trained = load_model(str(out))
    assert trained.model.config.sequence_decoding == "shifted" and trained.model.config.dim == 20
    assert trained.specs[RGB].vocab_size == 64 and trained.specs[NORMAL].vocab_size == 8192
    # ... and goes out again as ml-4m's hub layout, with the fixture's keys for what it shares with it
    from safetensors import safe_open

    from omniforge.jobs.cli import main as omniforge

    hub = tmp_path / "hub"
    assert omniforge(["export-4m", str(out), "--out", str(hub)]) == 2  # the run records no --tokenizers
    assert "records no --tokenizers directory" in capsys.readouterr().err and not hub.exists()
    assert omniforge(["export-4m", str(out), "--out", str(hub), "--model-only"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert omniforge(["export-4m", str(out), "--out", str(hub), "--model-only"]) == 2  # never over an export
    assert "already holds" in capsys.readouterr().err
    with safe_open(os.path.join(FIXTURES, "swiglu", "model.safetensors"), "pt") as f, \
            safe_open(str(hub / "model.safetensors"), "pt") as g:
        def kept(k):
            return not k.startswith(("encoder_embeddings.", "decoder_embeddings.")) or k.split(".")[1] in (RGB, GLOBAL)
        assert {k for k in f.keys() if kept(k)} == {k for k in g.keys() if NORMAL not in k}
    again = load_model(str(hub))
    assert again.config["released"] == str(hub) and set(again.specs) == {RGB, GLOBAL, NORMAL}
    batch = {m: d for m, d in _batch().items() if m in (RGB, GLOBAL)}
    with torch.no_grad():
        a, b = trained.model.decoder_logits(batch, scatter=True), again.model.decoder_logits(batch, scatter=True)
    assert set(a) == {RGB, GLOBAL} and all(torch.allclose(a[m], b[m], atol=1e-5) for m in a)


def test_loaded_modalities_start_from_the_checkpoint_and_the_added_one_trains(corpus, tmp_path):
    from safetensors.torch import load_file

    from omniforge._torch_run import Dist
    from omniforge.model.checkpoint import load_model
    from omniforge.model.train import _Run, train

    weights = load_file(os.path.join(FIXTURES, "swiglu", "model.safetensors"))
    cfg = _ft_cfg(corpus, tmp_path / "run", steps=8)
    run = _Run(cfg, torch.device("cpu"), Dist())  # the model at step 0, as train builds it
    start = {k: v.clone() for k, v in run.model.state_dict().items()}
    pairs = {"heads.tok_rgb@224.weight": "decoder_embeddings.tok_rgb@224.to_logits.weight",
             "encoder_tokens.tok_dinov2_global.weight": "encoder_embeddings.tok_dinov2_global.token_emb.weight",
             "decoder_positions.tok_dinov2_global": "decoder_embeddings.tok_dinov2_global.pos_emb",
             "encoder.1.mlp.fc2.weight": "encoder.1.mlp.fc2.weight", "context_proj.bias": "decoder_proj_context.bias"}
    for omni, ml in pairs.items():
        assert torch.equal(start[omni], weights[ml].reshape(start[omni].shape)), omni
    assert not any(NORMAL in k for k in weights)  # the added folder's parts are fresh
    assert start[f"heads.{NORMAL}.weight"].shape == (8192, 20) and start[f"heads.{NORMAL}.weight"].std() > 0
    assert any(NORMAL in line and "fresh" in line for line in run.init_lines)
    train(cfg, progress=False)
    end = load_model(str(tmp_path / "run")).model.state_dict()
    for key in (f"heads.{NORMAL}.weight", f"encoder_tokens.{NORMAL}.weight", f"modality_embeddings.{NORMAL}"):
        assert not torch.allclose(end[key], start[key]), key  # the added modality trains


def test_init_from_an_omniforge_checkpoint_and_resume(corpus, tmp_path, capsys):
    from omniforge.model.checkpoint import load_model
    from omniforge.model.train import train

    torch.set_num_threads(1)
    first = tmp_path / "first"
    train(_ft_cfg(corpus, first, steps=3, modalities=(RGB, GLOBAL)), progress=False)
    source = load_model(str(first)).model.state_dict()
    # from the omniforge run: the released layout carries over, NORMAL is added, GLOBAL dropped
    cfg = _ft_cfg(corpus, tmp_path / "second", steps=4, save_every=2, modalities=(RGB, NORMAL), init_from=str(first))
    capsys.readouterr()
    whole = train(cfg, progress=False)
    err = capsys.readouterr().err
    assert "omniforge checkpoint" in err and f"dropped {GLOBAL}" in err and f"added {NORMAL}" in err
    # resume: a run with a checkpoint is not initialised again, and continues exactly
    part = tmp_path / "part"
    train(_ft_cfg(corpus, part, steps=2, save_every=2, modalities=(RGB, NORMAL), init_from=str(first)),
          progress=False)
    shutil.rmtree(first)  # resuming needs only the run's own checkpoint
    capsys.readouterr()
    resumed = train(_ft_cfg(corpus, part, steps=4, save_every=2, modalities=(RGB, NORMAL), init_from=str(first)),
                    progress=False)
    assert "not applied, the run resumes from its own checkpoint" in capsys.readouterr().err
    assert [e["loss"] for e in resumed.losses] == [e["loss"] for e in whole.losses[2:]]
    assert "encoder.0.attn.qkv.weight" in source


def test_a_bad_init_from_is_one_line(corpus, tmp_path):
    from omniforge.model.train import train

    with pytest.raises(ConfigError) as e:
        train(_ft_cfg(corpus, tmp_path / "run", init_from=str(tmp_path)), progress=False)
    assert "\n" not in str(e.value) and "--init-from" in str(e.value)


def test_plan_maps_token_folders_to_ml4m_sequences_and_checks_vocabularies():
    from omniforge.model.init_from import plan_init
    from omniforge.model.specs import specs_for

    fixture = os.path.join(FIXTURES, "swiglu")
    plan = plan_init(fixture, specs_for(["tok_caption", RGB], 100))
    assert plan.loaded == {"tok_caption": "caption", RGB: RGB} and plan.config.sequence_decoding == "shifted"
    assert plan.specs[RGB].vocab_size == 64  # the registry's 16384 gives way to the checkpoint's head
    with pytest.raises(ConfigError) as e:  # a text tokenizer of another size is refused
        plan_init(fixture, specs_for(["tok_caption"], 300))
    assert "tok_caption's tokenizer has 300 ids, the checkpoint's caption 100" in str(e.value)


def test_plan_keeps_a_modality_at_224_and_448_apart():
    """tok_depth@224 and tok_depth@448 are one registry modality but two folders: each loads its own."""
    from omniforge.model.init_from import plan_init
    from omniforge.model.specs import specs_for

    run = ["tok_depth@448", "tok_depth@224", "tok_semseg@224"]
    plan = plan_init(os.path.join(FIXTURES, "chain"), specs_for(run, 100))
    assert plan.loaded == {m: m for m in run}
    assert plan.dropped == ["rgb@224", "tok_clip@224", "tok_dinov2_global"] and not plan.added
    assert {m: plan.specs[m].vocab_size for m in run} == dict.fromkeys(run, 256)
    plan = plan_init(os.path.join(FIXTURES, "swiglu"), specs_for(["tok_depth@448"], 100))
    assert plan.added == ["tok_depth@448"] and "tok_depth@224" in plan.dropped  # never the 196-token one


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_init_from_under_torchrun(corpus, tmp_path, strategy):
    import subprocess
    import sys

    out = tmp_path / strategy
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "omniforge.model.train", "--data", corpus, "--modalities", f"{RGB},{GLOBAL},{NORMAL}",
           "--out", str(out), "--init-from", os.path.join(FIXTURES, "swiglu"), "--steps", "3", "--save-every", "2",
           "--batch-size", "2", "--input-tokens", "16", "--target-tokens", "16", "--device", "cpu",
           "--no-tensorboard", "--no-progress", "--strategy", strategy]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(f"added {NORMAL}") == 1  # rank 0 logs
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
    from omniforge.model.checkpoint import load_model

    assert load_model(str(out)).model.config.separate_modality_embeddings


def test_a_released_model_generates_sequences():
    """A "shifted" model has no logits at a sequence's first target: generation reads them where they are."""
    from omniforge.model.sample import SampleConfig, generate

    model = load_released(os.path.join(FIXTURES, "swiglu")).model
    specs = model.specs
    rgb = _batch()[RGB]["tensor"][0].numpy()
    sentinels, eos = list(range(10, 20)), 3
    out = generate(model, specs, {RGB: rgb}, ["caption"], SampleConfig(temperature=0.0), sentinel_ids=sentinels,
                   eos_id=eos)
    ids = out["caption"]
    assert 1 <= len(ids) <= specs["caption"].num_tokens
    # greedy: the first token is the argmax of the logits at position 1, the first predicted one
    row = {k: torch.ones(1, specs["caption"].seq_len, dtype=torch.bool) for k in ("input_mask", "target_mask")}
    row["tensor"] = torch.zeros(1, specs["caption"].seq_len, dtype=torch.long)
    row["tensor"][0, 0] = sentinels[1]
    row["target_mask"][0, :2] = False
    batch = {RGB: {"tensor": torch.from_numpy(rgb)[None], "input_mask": torch.zeros(1, 196, dtype=torch.bool),
                   "target_mask": torch.ones(1, 196, dtype=torch.bool)}, "caption": row}
    with torch.no_grad():
        logits = model.decoder_logits(batch, scatter=True)["caption"][0, 1]
    banned = [0, *[s for s in sentinels if s != eos]]
    logits[banned] = float("-inf")
    assert ids[0] == int(logits.argmax())


def test_init_from_a_default_layout_omniforge_run(corpus, tmp_path, capsys):
    from omniforge.model.checkpoint import load_model
    from omniforge.model.train import train

    first = tmp_path / "first"
    train(_ft_cfg(corpus, first, steps=2, modalities=(RGB,), init_from=None), progress=False)
    capsys.readouterr()
    train(_ft_cfg(corpus, tmp_path / "second", steps=2, modalities=(RGB, NORMAL), init_from=str(first)),
          progress=False)
    err = capsys.readouterr().err
    assert f"added {NORMAL}" in err and "the model of first" in err
    source, model = load_model(str(first)).model, load_model(str(tmp_path / "second")).model
    assert model.config == source.config and model.config.sequence_decoding == "mask_first"  # omniforge's own
    assert set(source.state_dict()) < set(model.state_dict())


def test_a_modality_ml4m_names_alike_but_means_otherwise_is_not_loaded(tmp_path, monkeypatch):
    """A folder the registry marks as not ml-4m's modality of that name (ml4m "none", as omniforge's ViTPose
    keypoints, named human_poses before issue 14, were) is not loaded from a released checkpoint, and a model
    trained on it is not exported as ml-4m's. Here det is marked so."""
    from dataclasses import replace

    from omniforge.modalities import MODALITIES
    from omniforge.model.init_from import plan_init
    from omniforge.model.specs import specs_for

    monkeypatch.setitem(MODALITIES, "det", replace(MODALITIES["det"], ml4m="none", ml4m_note="omniforge's own boxes"))
    folder = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "swiglu"), folder)
    plan = plan_init(str(folder), specs_for(["det", RGB], 100))
    assert plan.loaded == {RGB: RGB} and plan.added == ["det"]
    lines = "\n".join(plan.lines())
    assert "added det: fresh embeddings and head, the checkpoint's det is another modality" in lines
    assert "dropped the checkpoint's det: not the modality" in lines
    with pytest.raises(ConfigError, match="det: omniforge's det is not ml-4m's modality of that name .omniforge's own"):
        export_released(load_released(str(folder)).model, str(tmp_path / "out"))


def test_a_released_human_poses_loads_with_ml4ms_logits_but_past_its_263_positions(tmp_path):
    """4M-21's human_poses (ml-4m's max_tokens 275, max_length 263) loads from a released checkpoint. ml-4m's decoder
    gives target ranks >= 263 position 0, omniforge counts on to 275 (omniforge/model/ml4m.py): on ml-4m's own
    logits every prediction agrees but those from rank 263 on (a 272-token target: 8 of them), which differ."""
    folder = os.path.join(FIXTURES, "poses")
    loaded = load_released(folder)
    assert loaded.released.specs["human_poses"].num_tokens == 275 and loaded.released.specs["human_poses"].raw
    expected, batch = _expected("poses"), _batch("poses")
    with torch.no_grad():
        logits = loaded.model.decoder_logits(batch, scatter=True)
    index, want = expected["index/human_poses"], expected["logits/human_poses"]
    got = logits["human_poses"][index[:, 0], index[:, 1]].numpy()
    targets = ~batch["human_poses"]["target_mask"].numpy()
    rank = np.array([int(targets[b, :p].sum()) - 1 for b, p in index])  # the rank of the query predicting it
    err = np.abs(got - want).max(axis=1)
    assert (rank >= 263).sum() == 8 and err[rank < 263].max() < 1e-4 and err[rank >= 263].min() > 1e-3
    caption = expected["index/caption"]
    np.testing.assert_allclose(logits["caption"][caption[:, 0], caption[:, 1]].numpy(), expected["logits/caption"],
                               atol=1e-4)
    export_released(loaded.model, str(tmp_path / "export"))  # and it exports as ml-4m's again
    again = load_released(str(tmp_path / "export"))
    with torch.no_grad():
        assert torch.equal(again.model.decoder_logits(batch, scatter=True)["human_poses"], logits["human_poses"])
