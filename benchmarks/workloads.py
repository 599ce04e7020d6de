"""The work being timed: one training step and k reverse steps, for ours and for diffusers.

Both sides get the same network (our U-Net's weights written into diffusers' ``UNet2DModel``
through ``ddpm.interop.diffusers``), the same batch shape, dtype and threads.

* Training step (both): draw t ~ U{0..T-1} and eps, x_t = sqrt(abar) x0 + sqrt(1-abar) eps,
  L_simple = mean((eps - net(x_t, t))^2), backward, clip the global grad norm to 1, Adam
  (lr 2e-4, betas 0.9/0.999, eps 1e-8, no weight decay), EMA 0.9999.
  - ours: the trainer's own step, ``ddpm.training.step.train_step`` (foreach Adam on CPU, fused
    on CUDA; ``grad_norm_and_clip``; multi-tensor EMA; per-step seeded generators on the
    device; the non-finite guard on the device: no host sync), with the options of
    ``train.channels_last`` / ``precision`` / ``compile`` / ``cuda_graph`` (the whole step
    replayed from one CUDA graph, ``ddpm.training.graphstep.StepGraph``).
  - diffusers: as its ``train_unconditional.py`` example does it: ``DDPMScheduler.add_noise``,
    ``F.mse_loss``, ``clip_grad_norm_``, ``torch.optim.Adam`` with its defaults, and
    ``diffusers.training_utils.EMAModel(decay=0.9999)`` with its defaults.
* Sampling: k ancestral steps at batch B, timed and extrapolated to 1000 steps.
  - ours: ``ddpm.sampling.sample(..., steps=k)`` (a k-step chain: the same per-step work as the
    full chain; setup included) with its fast-path options.
  - diffusers: ``DDPMPipeline.__call__``'s loop: ``scheduler.set_timesteps(k)``, then per step
    ``unet(x, t).sample`` and ``scheduler.step(out, t, x, generator=g).prev_sample``.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddpm.config import Config, TrainConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.nets.unet import UNet
from ddpm.winograd import winograd_convs

LR = 2e-4


def build_models(cfg: Config, device: torch.device, seed: int = 0, train: bool = False):
    """(ours, theirs): our U-Net for ``cfg.model`` and a diffusers ``UNet2DModel`` holding the
    same weights (ours' dropout rate is passed to diffusers too, so both do the same work)."""
    from diffusers import UNet2DModel

    from ddpm.interop.diffusers import model_to_diffusers_config, state_dict_to_diffusers

    torch.manual_seed(seed)
    ours = UNet.from_config(cfg.model, cfg.out_channels)
    dcfg = {k: v for k, v in model_to_diffusers_config(cfg.model, cfg.out_channels).items() if not k.startswith("_")}
    theirs = UNet2DModel(**dcfg)
    missing, unexpected = theirs.load_state_dict(state_dict_to_diffusers(ours.state_dict()), strict=True)
    assert not missing and not unexpected
    ours, theirs = ours.to(device), theirs.to(device)
    return (ours.train(), theirs.train()) if train else (ours.eval(), theirs.eval())


def fixed_batch(cfg: Config, batch: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """A stand-in for a data batch: float32 [B, C, H, W] in [-1, 1] (the values do not matter for speed)."""
    g = torch.Generator().manual_seed(seed)
    c, r = cfg.model.in_channels, cfg.model.resolution
    return (torch.rand((batch, c, r, r), generator=g) * 2 - 1).to(device)


# ---------------------------------------------------------------------------------------------- training
@dataclass
class OursOptions:
    channels_last: bool | None = False  # None: the trainer's default (train.channels_last=auto)
    precision: str = "fp32"     # fp32 | bf16 | fp16 (ddpm.training.precision)
    compile: bool = False
    fused_adam: bool | None = None  # None: the trainer's choice (fused on CUDA, foreach elsewhere)
    winograd: bool | None = False  # False direct, True always (untimed), None decided with the layout
    cuda_graph: bool = False  # train.cuda_graph: the whole step captured once and replayed

    def label(self) -> str:
        parts = [self.precision]
        if self.channels_last:
            parts.append("channels_last")
        elif self.channels_last is None:
            parts.append("auto layout")
        if self.winograd:
            parts.append("Winograd")
        elif self.winograd is None:
            parts.append("conv auto")
        if self.compile:
            parts.append("compile")
        if self.cuda_graph:
            parts.append("step graph")
        if self.fused_adam is not None:
            parts.append("fused Adam" if self.fused_adam else "foreach Adam")
        return " ".join(parts)


class OursTrainStep:
    """One optimiser step of the trainer itself (:func:`ddpm.training.step.train_step`: single
    process, no gradient accumulation, uniform t, no warm-up), on a fixed batch."""

    def __init__(self, model: UNet, diffusion: GaussianDiffusion, x0: torch.Tensor, device: torch.device,
                 opts: OursOptions, tc: TrainConfig | None = None):
        from dataclasses import replace

        from ddpm.config import ModelConfig
        from ddpm.netpath import decide
        from ddpm.training.ema import EMA
        from ddpm.training.optim import make_optimizer
        from ddpm.training.precision import resolve_precision
        from ddpm.training.step import TrainParts
        from ddpm.training.tsampler import make_t_sampler

        tc = replace(tc or TrainConfig(lr=LR), batch_size=x0.shape[0], grad_accum=1, warmup_steps=0,
                     t_sampler="uniform", channels_last="auto" if opts.channels_last is None else opts.channels_last,
                     precision=opts.precision)
        shape = replace(ModelConfig(), in_channels=x0.shape[1], resolution=x0.shape[2])
        # the trainer's decision (ddpm.netpath.for_training) for this batch: what is None is timed
        path = decide(model.train(), device, tuple(x0.shape), train=True, compile=opts.compile,
                      amp_dtype=resolve_precision(opts.precision, device).dtype, channels_last=opts.channels_last,
                      winograd=None if opts.winograd is None else bool(opts.winograd))
        self.path = path.describe()
        nhwc = path.channels_last
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        self.x0 = x0
        params = list(model.parameters())
        if opts.fused_adam is None:
            optimizer = make_optimizer(params, tc, device)
        else:
            kw = dict(lr=0.0, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps, weight_decay=0.0)
            optimizer = torch.optim.Adam(params, **kw, **({"fused": True} if opts.fused_adam else {"foreach": True}))
        self.parts = TrainParts(cfg=Config(model=shape, train=tc), model=model.train(),
                                train_model=torch.compile(model) if opts.compile else model, diffusion=diffusion,
                                ema=EMA(model, tc.ema_decay), optimizer=optimizer,
                                t_sampler=make_t_sampler("uniform", diffusion.num_timesteps),
                                precision=resolve_precision(opts.precision, device), device=device,
                                channels_last=nhwc)
        # as the trainer does: routed for the whole run (this model copy is this variant's own)
        self._winograd = winograd_convs(model, enabled=path.winograd, autograd=True,
                                        autotune=None if opts.winograd is None else False)
        self._winograd.__enter__()
        self.step = 0
        self.last_loss: torch.Tensor | None = None
        self.graph = None
        if opts.cuda_graph:
            from ddpm.training.graphstep import StepGraph

            # on the CPU (gpu.py --dry-run) the same bookkeeping runs without capture
            self.graph = StepGraph(self.parts, capture=device.type == "cuda")

    def __call__(self) -> None:
        from ddpm.training.step import Batch, train_step

        if self.graph is not None:
            result = self.graph(Batch(self.x0), self.step)
        else:
            result = train_step(self.parts, Batch(self.x0), self.step)
        self.last_loss = result.stats[0] / result.stats[1]  # stays on the device until read
        self.step += 1


class TheirsTrainStep:
    """One step of diffusers' ``examples/unconditional_image_generation/train_unconditional.py``
    (without Accelerate, which adds nothing on one device): add_noise, UNet2DModel, F.mse_loss,
    clip_grad_norm_, Adam (torch defaults), EMAModel (diffusers defaults)."""

    def __init__(self, model, x0: torch.Tensor, device: torch.device, num_timesteps: int = 1000,
                 amp_dtype: torch.dtype | None = None):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        self.model, self.x0, self.device, self.amp_dtype = model.train(), x0, device, amp_dtype
        self.scheduler = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="linear")
        self.optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.ema = EMAModel(model.parameters(), decay=0.9999)
        self.num_timesteps = num_timesteps
        self.last_loss: torch.Tensor | None = None

    def __call__(self) -> None:
        x0 = self.x0
        noise = torch.randn(x0.shape, device=self.device)
        t = torch.randint(0, self.num_timesteps, (x0.shape[0],), device=self.device).long()
        noisy = self.scheduler.add_noise(x0, noise, t)
        ctx = (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None
               else contextlib.nullcontext())
        with ctx:
            out = self.model(noisy, t).sample
        loss = F.mse_loss(out.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.ema.step(self.model.parameters())
        self.last_loss = loss.detach()


class PlainModuleStep:
    """The network as a researcher drops it into their own loop: a fixed batch, random t and
    noise drawn once, ``out = net(x_t, t)`` (diffusers: ``.sample``), mean squared error,
    ``backward``, ``torch.optim.Adam`` with its defaults at lr 2e-4. No layout change, no
    Winograd, no fused or foreach choice of ours: what ``ddpm.UNet`` costs by itself."""

    def __init__(self, model, cfg: Config, batch: int, device: torch.device, diffusers: bool = False):
        g = torch.Generator().manual_seed(3)
        c, r = cfg.model.in_channels, cfg.model.resolution
        self.model, self.diffusers = model.train(), diffusers
        self.x = torch.randn((batch, c, r, r), generator=g).to(device)
        self.t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        self.eps = torch.randn((batch, c, r, r), generator=g).to(device)
        self.opt = torch.optim.Adam(model.parameters(), lr=LR)

    def __call__(self) -> None:
        out = self.model(self.x, self.t)
        out = out.sample if self.diffusers else out
        loss = F.mse_loss(out, self.eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


# ---------------------------------------------------------------------------------------------- sampling
@dataclass
class SampleOptions:
    channels_last: bool | None = None  # None: sample()'s default (ddpm.fast.wants_channels_last)
    compile: bool = False
    cuda_graph: bool = False
    amp_dtype: torch.dtype | None = None
    # None: sample()'s default (autotuned on the CPU: Winograd where timing finds it faster);
    # True: Winograd for every conv with >= 128 channels, untimed (DDPM_AUTOTUNE=0 for the call)
    winograd: bool | None = None

    def label(self) -> str:
        parts = ["bf16" if self.amp_dtype == torch.bfloat16 else "fp16" if self.amp_dtype == torch.float16 else "fp32"]
        parts.append({False: "NCHW", True: "channels_last", None: "auto layout"}[self.channels_last])
        if self.winograd:
            parts.append("Winograd")
        elif self.winograd is None and self.amp_dtype is None and not self.compile:
            parts.append("conv auto")
        if self.compile:
            parts.append("compile")
        if self.cuda_graph:
            parts.append("CUDA graph")
        return " ".join(parts)


class OursSampler:
    """``k`` reverse steps of ``ddpm.sampling.sample`` (a k-step chain) for a batch of B seeds."""

    def __init__(self, model, diffusion: GaussianDiffusion, shape, batch: int, steps: int, device: torch.device,
                 opts: SampleOptions):
        self.model, self.diffusion, self.shape, self.steps, self.device, self.opts = \
            model, diffusion, tuple(shape), int(steps), device, opts
        self.seeds = list(range(batch))
        self.last: torch.Tensor | None = None

    def __call__(self) -> None:
        from ddpm.sampling import sample
        from ddpm.speed import Speed

        o = self.opts
        speed = Speed(compile=o.compile, channels_last=o.channels_last, cuda_graph=o.cuda_graph, winograd=o.winograd)
        with _static_routing(bool(o.winograd)):
            self.last = sample(self.diffusion, self.model, self.shape, self.seeds, device=self.device,
                               steps=None if self.steps == self.diffusion.num_timesteps else self.steps,
                               amp_dtype=o.amp_dtype, speed=speed)


@contextlib.contextmanager
def _static_routing(on: bool):
    """``DDPM_AUTOTUNE=0`` for the block when ``on`` (forced Winograd: the static rule, untimed)."""
    import os

    from ddpm import autotune

    old = os.environ.get(autotune.ENV_SWITCH)
    if on:
        os.environ[autotune.ENV_SWITCH] = "0"
    try:
        yield
    finally:
        if on:
            if old is None:
                os.environ.pop(autotune.ENV_SWITCH, None)
            else:
                os.environ[autotune.ENV_SWITCH] = old


class TheirsSampler:
    """``k`` steps of ``DDPMPipeline.__call__``'s loop (fp32, as the pipeline runs)."""

    def __init__(self, model, shape, batch: int, steps: int, device: torch.device, num_timesteps: int = 1000):
        from diffusers import DDPMScheduler

        self.model, self.shape, self.batch, self.steps, self.device = model, tuple(shape), batch, int(steps), device
        # google/ddpm-cifar10-32's scheduler: linear 1e-4..0.02, clip_sample, epsilon, fixed_large
        self.scheduler = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="linear",
                                       variance_type="fixed_large", clip_sample=True)
        self.last: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self) -> None:
        from diffusers.utils.torch_utils import randn_tensor

        g = torch.Generator(device=self.device).manual_seed(0)
        image = randn_tensor((self.batch, *self.shape), generator=g, device=self.device, dtype=self.model.dtype)
        self.scheduler.set_timesteps(self.steps)
        for t in self.scheduler.timesteps:
            out = self.model(image, t).sample
            image = self.scheduler.step(out, t, image, generator=g).prev_sample
        self.last = image


def copy_model(model):
    """An independent copy (its own weights, so each variant has its own optimiser and EMA state)."""
    return copy.deepcopy(model)
