"""Weights to and from diffusers' UNet2DModel: numerical parity both ways, config checks, folders."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import ddpm
from ddpm.checkpoint import add_prefix, load_checkpoint, save_checkpoint
from ddpm.config import Config, DiffusionConfig, ModelConfig
from ddpm.errors import CheckpointError
from ddpm.interop.diffusers import (diffusers_config_to_model, from_diffusers_dir, model_to_diffusers_config,
                                    state_dict_from_diffusers, state_dict_to_diffusers, to_diffusers_dir)
from ddpm.nets.unet import UNet

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

# google/ddpm-cifar10-32's config.json, written out as the released file has it.
CIFAR_CONFIG = {
    "_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 3, "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-6, "act_fn": "silu",
    "attention_head_dim": None, "time_embedding_type": "positional", "flip_sin_to_cos": False, "freq_shift": 1,
    "downsample_padding": 0, "resnet_time_scale_shift": "default", "center_input_sample": False,
    "mid_block_scale_factor": 1,
}
# The 256x256 layout (attention at 16x16 only), reduced width and size so it runs fast: at sample_size 64
# the 16x16 level is the third block.
SMALL_256_CONFIG = dict(CIFAR_CONFIG, sample_size=64, block_out_channels=[32, 32, 64, 64, 128, 128],
                        down_block_types=["DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                          "DownBlock2D", "DownBlock2D"],
                        up_block_types=["UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D",
                                        "UpBlock2D"])
TIMESTEPS = [0, 1, 250, 999]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet_diffusers():
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()  # attention_head_dim=None warns on every block
    yield
    dlog.set_verbosity(level)


def _perturb(model: torch.nn.Module, scale: float = 0.02, seed: int = 1) -> torch.nn.Module:
    """Random offsets on every parameter: the near-zero-initialised layers must matter too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _diffusers_unet(cfg: dict) -> UNet2DModel:
    kw = {k: v for k, v in cfg.items() if not k.startswith("_")}
    return _perturb(UNet2DModel(**kw)).eval()


def _max_diff(theirs, ours, shape, seed=0) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(TIMESTEPS), *shape, generator=g)
    t = torch.tensor(TIMESTEPS)
    with torch.no_grad():
        a = theirs(x, t).sample
        b = ours(x, t)
    assert a.shape == b.shape == x.shape[:1] + (theirs.config.out_channels,) + x.shape[2:]
    return (a - b).abs().max().item()


def _write_ours(path, model: UNet, cfg: Config) -> None:
    save_checkpoint(path, add_prefix(model.state_dict(), "ema/"),
                    {"config": cfg.to_dict(), "kind": "weights", "step": 0, "version": ddpm.__version__})


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("cfg,res", [(CIFAR_CONFIG, 32), (SMALL_256_CONFIG, 64)], ids=["cifar10-32", "256-layout"])
def test_from_diffusers_matches_unet2dmodel(tmp_path, cfg, res):
    torch.manual_seed(0)
    theirs = _diffusers_unet(cfg)
    theirs.save_pretrained(tmp_path / "hf")
    out = from_diffusers_dir(tmp_path / "hf", tmp_path / "ours.safetensors")
    loaded = ddpm.load(out, device="cpu")
    ours = loaded.model
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    if cfg is CIFAR_CONFIG:
        assert sum(p.numel() for p in ours.parameters()) == 35_746_307
        assert loaded.config.model == ModelConfig(resolution=32, in_channels=3, ch=128, ch_mult=(1, 2, 2, 2),
                                                  num_res_blocks=2, attn_resolutions=(16,), dropout=0.0)
        assert loaded.config.diffusion.var_type == "fixedlarge"  # the official sampling scripts' default for 32x32, no scheduler file
    else:
        assert loaded.config.model.attn_resolutions == (16,) and loaded.config.diffusion.var_type == "fixedsmall"
    diff = _max_diff(theirs, ours, (3, res, res))
    print(f"max |diffusers - ours| {cfg['block_out_channels']}: {diff:.2e}")
    assert diff <= 1e-4


def test_to_diffusers_matches_and_pipeline_loads(tmp_path):
    torch.manual_seed(0)
    mc = ModelConfig(resolution=16, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(8,),
                     dropout=0.1)
    cfg = Config(preset="test", model=mc, diffusion=DiffusionConfig(var_type="fixedlarge")).validate()
    ours = _perturb(UNet.from_config(mc, cfg.out_channels)).eval()
    _write_ours(tmp_path / "ckpt.safetensors", ours, cfg)
    out = to_diffusers_dir(tmp_path / "ckpt.safetensors", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                     "model_index.json", "scheduler_config.json"]
    theirs = UNet2DModel.from_pretrained(out).eval()
    diff = _max_diff(theirs, ours, (3, 16, 16))
    print(f"max |ours -> diffusers| (ch 32, mult 1,2,2, 16x16): {diff:.2e}")
    assert diff <= 1e-4

    sched = DDPMScheduler.from_pretrained(out)
    np.testing.assert_allclose(sched.betas.numpy(), np.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-8)
    assert sched.config.variance_type == "fixed_large" and sched.config.prediction_type == "epsilon"
    assert sched.config.clip_sample is True and sched.config.num_train_timesteps == 1000
    pipe = DDPMPipeline.from_pretrained(out)
    assert isinstance(pipe.unet, UNet2DModel) and isinstance(pipe.scheduler, DDPMScheduler)
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    mc = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     dropout=0.0)
    dc = DiffusionConfig(num_timesteps=100, beta_schedule="cosine", mean_type="xstart", var_type="learned_range",
                         loss_type="hybrid")
    cfg = Config(preset="test", model=mc, diffusion=dc).validate()
    model = _perturb(UNet.from_config(mc, cfg.out_channels))
    _write_ours(tmp_path / "a.safetensors", model, cfg)
    to_diffusers_dir(tmp_path / "a.safetensors", tmp_path / "hf")
    sched = json.loads((tmp_path / "hf" / "scheduler_config.json").read_text())
    assert sched["variance_type"] == "learned_range" and sched["prediction_type"] == "sample"
    assert len(sched["trained_betas"]) == 100  # cosine written out as explicit betas
    from_diffusers_dir(tmp_path / "hf", tmp_path / "b.safetensors")
    a, _ = load_checkpoint(tmp_path / "a.safetensors")
    b, meta = load_checkpoint(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    back = Config.from_dict(meta["config"])
    assert back.model == mc and back.diffusion == dc and back.preset == "converted"
    assert meta["kind"] == "weights" and meta["step"] == 0 and meta["source"]["format"] == "diffusers"


def test_round_trip_carries_v_prediction(tmp_path):
    """v = alpha eps - sigma x0 (Salimans & Ho 2022) is diffusers' prediction_type="v_prediction", both ways."""
    torch.manual_seed(0)
    mc = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     dropout=0.0)
    dc = DiffusionConfig(num_timesteps=200, beta_start=5e-4, beta_end=0.1, mean_type="v")
    cfg = Config(preset="test", model=mc, diffusion=dc).validate()
    _write_ours(tmp_path / "a.safetensors", _perturb(UNet.from_config(mc, cfg.out_channels)), cfg)
    to_diffusers_dir(tmp_path / "a.safetensors", tmp_path / "hf")
    sched = DDPMScheduler.from_pretrained(tmp_path / "hf")
    assert sched.config.prediction_type == "v_prediction" and sched.config.num_train_timesteps == 200
    from_diffusers_dir(tmp_path / "hf", tmp_path / "b.safetensors")
    a, _ = load_checkpoint(tmp_path / "a.safetensors")
    b, meta = load_checkpoint(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Config.from_dict(meta["config"]).diffusion == dc


# ---------------------------------------------------------------------------------------------- class-conditional

COND_CONFIG = dict(CIFAR_CONFIG, sample_size=16, block_out_channels=[32, 64, 64], layers_per_block=1,
                   down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"],
                   up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"], num_class_embeds=5)  # 4 classes + null


def _cond_diff(theirs, ours, y, t, dtype) -> float:
    """max |UNet2DModel(x, t, class_labels=y) - UNet(x, t, y)| over a batch, in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(y), 3, 16, 16, generator=g, dtype=torch.float64).to(dtype)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    with torch.no_grad():
        a = theirs(x, torch.tensor(t), class_labels=torch.tensor(y)).sample
        b = ours(x, torch.tensor(t), torch.tensor(y))
    assert a.shape == b.shape == x.shape
    return (a - b).abs().max().item(), a.abs().max().item()


def _cond_checks(theirs, ours) -> None:
    # 1. float64 at t = 0, where both sinusoids are exact (sin 0 = 0, cos 0 = 1) however their
    #    frequencies round: the networks then differ only by float64 summation order, each output
    #    a chain of ~40 layers whose reductions are at most 9 * 128 long: |diff| <= 2^-53 * 40 *
    #    1152 * (max |out| + 1) (a bound, not this machine's value). A class table added anywhere
    #    else (before the MLP, after the swish) or a shifted row moves the output by O(0.01).
    y = [0, 1, 2, 3, 4, 2]
    diff, scale = _cond_diff(theirs, ours, y, [0] * len(y), torch.float64)
    assert diff <= 2.0 ** -53 * 40 * 1152 * (scale + 1.0), diff
    # 2. float32 over the whole range of t, at the converter's usual bound (the two sinusoids
    #    round their fp32 phases t * f differently: up to ~1e-4 at t = 999).
    diff, _ = _cond_diff(theirs, ours, [4, 0, 3, 1], TIMESTEPS, torch.float32)
    assert diff <= 1e-4, diff


def test_conditional_from_diffusers_matches_unet2dmodel_with_class_labels(tmp_path):
    torch.manual_seed(0)
    theirs = _diffusers_unet(COND_CONFIG).double()
    theirs.save_pretrained(tmp_path / "hf", safe_serialization=True)
    out = from_diffusers_dir(tmp_path / "hf", tmp_path / "ours.safetensors")
    loaded = ddpm.load(out, device="cpu")
    assert loaded.config.model.num_classes == 4 and loaded.model.num_classes == 4
    assert tuple(loaded.model.class_emb.weight.shape) == (5, 128)
    _cond_checks(theirs, loaded.model.double())


def test_conditional_to_diffusers_matches_and_round_trips(tmp_path):
    torch.manual_seed(0)
    mc = ModelConfig(resolution=16, in_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,),
                     dropout=0.0, num_classes=4)
    cfg = Config(preset="test", model=mc, diffusion=DiffusionConfig(var_type="fixedlarge")).validate()
    ours = _perturb(UNet.from_config(mc, cfg.out_channels)).eval()
    _write_ours(tmp_path / "a.safetensors", ours, cfg)
    out = to_diffusers_dir(tmp_path / "a.safetensors", tmp_path / "hf")
    conf = json.loads((out / "config.json").read_text())
    assert conf["num_class_embeds"] == 5 and conf["class_embed_type"] is None
    theirs = UNet2DModel.from_pretrained(out).eval()
    assert tuple(theirs.class_embedding.weight.shape) == (5, 128)
    _cond_checks(theirs.double(), ours.double())
    from_diffusers_dir(out, tmp_path / "b.safetensors")
    a, _ = load_checkpoint(tmp_path / "a.safetensors")
    b, meta = load_checkpoint(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert Config.from_dict(meta["config"]).model == mc


# ---------------------------------------------------------------------------------------------- state dicts


def test_state_dict_names_match_unet2dmodel_and_invert_exactly():
    with torch.device("meta"):
        ours = UNet.from_preset("256").state_dict()
        kw = {k: v for k, v in CIFAR_CONFIG.items() if not k.startswith("_")}
        kw.update(sample_size=256, block_out_channels=[128, 128, 256, 256, 512, 512],
                  down_block_types=["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4)
        theirs = UNet2DModel(**kw).state_dict()
    mapped = state_dict_to_diffusers(ours)
    assert set(mapped) == set(theirs)
    assert all(tuple(mapped[k].shape) == tuple(theirs[k].shape) for k in theirs)
    back = state_dict_from_diffusers(mapped)
    assert list(back) == list(ours) and all(back[k] is ours[k] for k in ours)


def test_legacy_attention_names_are_read(tmp_path):
    torch.manual_seed(0)
    theirs = _diffusers_unet(SMALL_256_CONFIG)
    sd = theirs.state_dict()
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v[:, :, None, None] if ".query.weight" in k else v  # some old files stored 1x1 convs
    assert any(".proj_attn." in k for k in legacy)
    ours = state_dict_from_diffusers(legacy)
    assert ours.keys() == state_dict_from_diffusers(sd).keys()
    assert ours["down.2.attn.0.q.weight"].shape == (64, 64)
    with pytest.raises(CheckpointError, match="foo"):
        state_dict_from_diffusers({**sd, "down_blocks.0.foo.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------- config checks


def test_cifar_config_translates():
    mc, out_ch = diffusers_config_to_model(CIFAR_CONFIG)
    assert out_ch == 3 and mc.ch == 128 and mc.ch_mult == (1, 2, 2, 2) and mc.attn_resolutions == (16,)
    assert model_to_diffusers_config(mc, 3)["down_block_types"] == CIFAR_CONFIG["down_block_types"]
    assert diffusers_config_to_model(model_to_diffusers_config(mc, 6)) == (mc, 6)
    assert diffusers_config_to_model(dict(CIFAR_CONFIG, attention_head_dim=256))[0] == mc  # one head, explicit
    assert diffusers_config_to_model(dict(CIFAR_CONFIG, layers_per_block=3))[0].num_res_blocks == 3


@pytest.mark.parametrize("field,value", [
    ("flip_sin_to_cos", True), ("freq_shift", 0), ("time_embedding_type", "fourier"), ("norm_eps", 1e-5),
    ("norm_num_groups", 16), ("act_fn", "gelu"), ("downsample_padding", 1), ("resnet_time_scale_shift", "scale_shift"),
    ("attention_head_dim", 8), ("center_input_sample", True), ("class_embed_type", "timestep"),
    ("num_class_embeds", 1), ("add_attention", False), ("mid_block_scale_factor", 2), ("downsample_type", "resnet"),
    ("upsample_type", "resnet"), ("mid_block_type", "UNetMidBlock2DCrossAttn"), ("time_embedding_dim", 256),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"]),
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D", "DownBlock2D", "DownBlock2D"]),
    ("block_out_channels", [128, 192, 256, 256]), ("out_channels", 4), ("sample_size", [32, 16]),
    ("layers_per_block", 0), ("foo", 1),
])
def test_unsupported_config_field_is_named(field, value):
    with pytest.raises(CheckpointError) as e:
        diffusers_config_to_model(dict(CIFAR_CONFIG, **{field: value}), where="hf/config.json")
    msg = str(e.value)
    assert msg.startswith("hf/config.json") and field in msg and json.dumps(value) in msg


def test_missing_fields_take_diffusers_defaults():
    # UNet2DModel's defaults are flip_sin_to_cos=True, freq_shift=0: not the official embedding
    cfg = {k: v for k, v in CIFAR_CONFIG.items() if k != "flip_sin_to_cos"}
    with pytest.raises(CheckpointError, match="flip_sin_to_cos"):
        diffusers_config_to_model(cfg)


def test_model_diffusers_cannot_express_is_refused(tmp_path):
    mc = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(2, 2), num_res_blocks=1, attn_resolutions=(),
                     dropout=0.0)
    with pytest.raises(CheckpointError, match="ch_mult"):
        model_to_diffusers_config(mc, 1)


def test_xprev_exports_unet_only_with_a_warning(tmp_path):
    mc = ModelConfig(resolution=8, in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                     dropout=0.0)
    cfg = Config(preset="test", model=mc, diffusion=DiffusionConfig(mean_type="xprev", loss_type="kl")).validate()
    _write_ours(tmp_path / "c.safetensors", UNet.from_config(mc, 1), cfg)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "scheduler_config.json").write_text("{}")  # stale file from an older export
    with pytest.warns(UserWarning, match="mean_type"):
        out = to_diffusers_dir(tmp_path / "c.safetensors", tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    UNet2DModel.from_pretrained(out)
    with pytest.raises(CheckpointError, match="'model' weights"):
        to_diffusers_dir(tmp_path / "c.safetensors", tmp_path / "hf2", weights="model")


# ---------------------------------------------------------------------------------------------- folders


def _small_hf(tmp_path, name="hf"):
    cfg = dict(CIFAR_CONFIG, sample_size=8, block_out_channels=[32, 64], layers_per_block=1,
               down_block_types=["DownBlock2D", "AttnDownBlock2D"], up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    model = _diffusers_unet(cfg)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def test_pipeline_folder_bin_weights_and_scheduler(tmp_path):
    torch.manual_seed(0)
    model, flat = _small_hf(tmp_path)
    pipe = tmp_path / "pipe"
    (pipe / "unet").mkdir(parents=True)
    shutil.copy(flat / "config.json", pipe / "unet" / "config.json")
    torch.save(model.state_dict(), pipe / "unet" / "diffusion_pytorch_model.bin")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="scaled_linear", variance_type="fixed_small").save_pretrained(
        pipe / "scheduler")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    out = from_diffusers_dir(pipe, tmp_path / "p.safetensors")
    loaded = ddpm.load(out, device="cpu")
    d = loaded.config.diffusion
    assert (d.num_timesteps, d.beta_schedule, d.var_type, d.mean_type) == (500, "quad", "fixedsmall", "eps")
    assert _max_diff(model, loaded.model, (3, 8, 8)) <= 1e-4


@pytest.mark.parametrize("sched,field", [
    (dict(prediction_type="flow_prediction"), "prediction_type"),  # v_prediction is our v
    (dict(variance_type="learned"), "variance_type"),
    (dict(beta_schedule="sigmoid"), "beta_schedule"),
])
def test_unsupported_scheduler_is_named(tmp_path, sched, field):
    _, flat = _small_hf(tmp_path)
    (flat / "scheduler_config.json").write_text(json.dumps(dict(_class_name="DDPMScheduler", **sched)))
    with pytest.raises(CheckpointError, match=field):
        from_diffusers_dir(flat, tmp_path / "x.safetensors")


def test_missing_folder_and_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nope"):
        from_diffusers_dir(tmp_path / "nope", tmp_path / "x.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        from_diffusers_dir(tmp_path / "empty", tmp_path / "x.safetensors")
    _, flat = _small_hf(tmp_path)
    (flat / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors"):
        from_diffusers_dir(flat, tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        to_diffusers_dir(tmp_path / "missing.safetensors", tmp_path / "out")
    assert not (tmp_path / "x.safetensors").exists()


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path):
    _, flat = _small_hf(tmp_path)
    cfg = json.loads((flat / "config.json").read_text())
    cfg["block_out_channels"] = [64, 128]
    (flat / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not fit"):
        from_diffusers_dir(flat, tmp_path / "x.safetensors")
