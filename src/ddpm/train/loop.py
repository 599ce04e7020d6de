"""The training loop (spec section 8): ``train(cfg, out_dir, resume=None)``.

One optimiser step at step index ``s`` (0-based; ``s`` steps are already done):

1. LR = lr·min(s/warmup, 1) (0 at s = 0, spec 8.2).
2. t and ε for the whole *global* batch come from generators seeded by (train.seed, s), so they
   do not depend on the number of processes or on resuming; each rank takes its slice.
3. The rank's examples are split into ``grad_accum`` micro-batches; each contributes
   mean(w·L)/grad_accum to the gradient (w = importance weights, 1 for uniform t), and DDP
   averages over ranks, so the gradient is that of the full-batch mean loss.
4. Global-norm clipping at train.grad_clip, then Adam, then the EMA update.
   A non-finite loss or gradient norm skips 4 (no weight, optimiser or EMA change); after
   train.max_nonfinite_in_row such steps in a row the run stops without writing a checkpoint.

Determinism: dropout draws from the global torch RNG, whose state (per rank, CPU and CUDA) is
checkpointed along with the model, EMA, Adam moments, data position and t-sampler history. On a
CPU, N steps in one go and N/2 + resume + N/2 give bit-identical weights.

The step counter counts consumed batches, including skipped non-finite steps; Adam's own step
count only counts applied updates.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .. import __version__
from ..checkpoint import add_prefix, load_checkpoint, save_checkpoint, split_prefix
from ..config import Config
from ..errors import CheckpointError, ConfigError, UserError
from ..winograd import winograd_convs
from . import distributed as D
from .ema import EMA
from .observe import MetricsWriter, Progress, Window, batch_stats, write_sample_grid
from .optim import (apply_update, grad_norm_and_clip, load_optimizer_tensors, make_optimizer, optimizer_tensors,
                    set_lr, warmup_lr)
from .precision import resolve_precision
from .state import (RunFolder, check_resume_compatible, check_train_meta, find_resume_checkpoint, refuse_overwrite,
                    step_of)
from .tsampler import make_t_sampler

# Stream identifiers mixed into the per-step seeds (any fixed distinct numbers).
_T_STREAM, _NOISE_STREAM, _DROPOUT_STREAM, _INIT_STREAM = 1, 2, 3, 4


class NonFiniteLossError(UserError):
    """Too many non-finite losses/gradients in a row: the run diverged."""


def stream_seed(*parts: int) -> int:
    """A 63-bit seed that mixes integers well (numpy SeedSequence), e.g. (train.seed, step, stream)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def train(cfg: Config, out_dir: str | Path, resume: str | None = None, device: str | None = None,
          progress: bool = True, log: Callable[[str], Any] = print) -> dict:
    """Train ``cfg`` into the run folder ``out_dir``.

    Args:
        cfg: the resolved config (validated here).
        out_dir: run folder; created if missing.
        resume: ``None`` for a fresh run (refused if ``out_dir`` already holds checkpoints),
            ``"auto"`` for the newest readable checkpoint in ``out_dir`` (a fresh run if there is
            none), or the path of a checkpoint file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA when available (under torchrun
            ``cuda:LOCAL_RANK``).
        progress: show a tqdm bar (rank 0).
        log: where messages go (rank 0).
    Returns:
        {"step", "checkpoint" (str or None), "run_dir", "skipped_nonfinite", "loss" (last window
        mean or None), "steps_per_s" (this session), "rank", "world_size"}.
    Raises:
        UserError subclasses for configuration, data, checkpoint and divergence problems.
    """
    cfg = cfg.validate()
    env = D.setup(device)
    ok = False
    try:
        result = _Trainer(cfg, Path(out_dir), env, progress, log).run(resume)
        ok = True
        return result
    finally:
        if ok:
            D.teardown(env)
        elif env.owns_group:
            # An exception on every rank (decisions are shared): no barrier, just leave.
            torch.distributed.destroy_process_group()


def _rank0(env: D.DistEnv, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and share its result; a UserError there is raised on every rank."""
    result, err = None, None
    if env.is_main:
        try:
            result = fn()
        except UserError as e:
            err = (type(e).__name__, str(e))
    result, err = D.broadcast_object(env, (result, err))
    if err is not None:
        cls = {c.__name__: c for c in (UserError, ConfigError, CheckpointError, NonFiniteLossError)}.get(err[0],
                                                                                                        UserError)
        raise cls(err[1])
    return result


class _Trainer:
    def __init__(self, cfg: Config, out_dir: Path, env: D.DistEnv, progress: bool, log: Callable[[str], Any]):
        self.cfg, self.env = cfg, env
        self.run_dir = RunFolder(out_dir)
        self.show_progress = progress and env.is_main
        self._log = log
        self.bar: Progress | None = None
        tc = cfg.train
        if tc.batch_size % (env.world_size * tc.grad_accum) != 0:
            raise ConfigError(f"invalid value for train.batch_size: {tc.batch_size}; expected a multiple of "
                              f"world_size×grad_accum = {env.world_size}×{tc.grad_accum}")
        self.local_batch = tc.batch_size // env.world_size
        self.micro_batch = self.local_batch // tc.grad_accum

    def log(self, msg: str) -> None:
        if not self.env.is_main:
            return
        if self.bar is None or not self.bar.write(msg):
            self._log(msg)

    # ------------------------------------------------------------------------------------ setup

    def _choose_start(self, resume: str | None) -> tuple[str | None, dict | None, dict | None]:
        """(checkpoint path or None, tensors, meta): rank 0 decides, every rank then loads."""
        loaded: dict[str, tuple[dict, dict]] = {}  # rank 0 keeps what it verified: no second read

        def decide() -> str | None:
            if resume is None:
                refuse_overwrite(self.run_dir)
                return None
            if resume == "auto":
                found = find_resume_checkpoint(self.run_dir, self.log)
                if found is None:
                    self.log(f"no checkpoint in {self.run_dir.ckpt_dir}; starting a fresh run")
                    return None
                loaded[str(found[0])] = (found[1], found[2])
                return str(found[0])
            path = Path(resume)
            if not path.is_file():
                raise CheckpointError(f"--resume {resume}: no such checkpoint file "
                                      f"(use 'auto' or a ckpt_*.safetensors path)")
            tensors, meta = load_checkpoint(path)  # verifies the checksum before anything is written
            check_train_meta(path, meta)
            newer = [f.name for f in self.run_dir.checkpoints() if step_of(f) > int(meta["step"])]
            if newer:
                raise UserError(f"{self.run_dir.root} holds checkpoints newer than {path.name} ({newer[-1]}); "
                                f"resuming there would overwrite them: choose another --out")
            loaded[str(path)] = (tensors, meta)
            return str(path)

        path = _rank0(self.env, decide)
        if path is None:
            return None, None, None
        if path in loaded:
            tensors, meta = loaded.pop(path)
        else:  # other ranks (the run folder must be on a filesystem every node sees)
            tensors, meta = load_checkpoint(path)
            check_train_meta(Path(path), meta)
        return path, tensors, meta

    def _build(self) -> None:
        from ..diffusion import GaussianDiffusion
        from ..nets.unet import UNet

        cfg, dev = self.cfg, self.env.device
        # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
        torch.manual_seed(stream_seed(cfg.train.seed, 0, _INIT_STREAM))
        model = UNet.from_config(cfg.model, cfg.out_channels).to(dev)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self.T = int(self.diffusion.num_timesteps)
        self.ema = EMA(model, cfg.train.ema_decay)
        self.param_names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.optimizer = make_optimizer(self.params, cfg.train, dev)
        self.t_sampler = make_t_sampler(cfg.train.t_sampler, self.T)
        self.precision = resolve_precision(cfg.train.precision, dev)

    def _open_data(self):
        from ..data import open_dataset
        from .batches import BatchSource

        cfg, env = self.cfg, self.env
        ds = open_dataset(cfg.data.source, "train", cfg.model.resolution, cfg.model.in_channels,
                          cfg.data.skip_bad_images, self.log)
        self.batches = BatchSource(ds, cfg.train.batch_size, cfg.train.seed, cfg.data.random_flip,
                                   env.rank, env.world_size, cfg.train.num_workers,
                                   pin_memory=env.device.type == "cuda")
        self.log(f"data: {cfg.data.source}: {len(ds)} images; global batch {cfg.train.batch_size} = "
                 f"{env.world_size} process(es) × {self.local_batch}"
                 + (f" ({cfg.train.grad_accum} micro-batches of {self.micro_batch})" if cfg.train.grad_accum > 1
                    else ""))

    def _restore(self, path: str, tensors: dict, meta: dict) -> None:
        from ..api import load_state_strict

        old = Config.from_dict(meta["config"])
        diffs = check_resume_compatible(old, self.cfg, Path(path))
        for k, a, b in diffs:
            self.log(f"resume: {k} changes from {a!r} to {b!r}")
        load_state_strict(self.model, split_prefix(tensors, "model/"), path)
        load_state_strict(self.ema.module, split_prefix(tensors, "ema/"), path)
        load_optimizer_tensors(self.optimizer, self.param_names, split_prefix(tensors, "optim/"),
                               meta.get("optimizer", {}))
        self.t_sampler.load_state_tensors(split_prefix(tensors, "tsampler/"))
        self.batches.load_state_dict(meta["data_sampler"])
        if self.precision.scaler is not None and meta.get("grad_scaler"):
            self.precision.scaler.load_state_dict(meta["grad_scaler"])
        self.step = int(meta["step"])
        self.skipped = int(meta.get("skipped_nonfinite", 0))
        self.in_row = int(meta.get("nonfinite_in_row", 0))
        cpu = tensors.get(f"rng/cpu/{self.env.rank}")
        if cpu is not None and int(meta.get("world_size", 1)) == self.env.world_size:
            torch.set_rng_state(cpu)
            cuda = tensors.get(f"rng/cuda/{self.env.rank}")
            if cuda is not None and self.env.device.type == "cuda":
                torch.cuda.set_rng_state(cuda, self.env.device)
        else:
            self.log(f"resume: the checkpoint was written by {meta.get('world_size', 1)} process(es), now "
                     f"{self.env.world_size}; dropout randomness restarts from a fresh seed (the data order "
                     f"and t/noise draws are unaffected)")
            self._seed_dropout()
        self.log(f"resumed from {path} at step {self.step}")

    def _seed_dropout(self) -> None:
        seed = stream_seed(self.cfg.train.seed, self.step, self.env.rank, _DROPOUT_STREAM)
        torch.manual_seed(seed)

    # ------------------------------------------------------------------------------------ checkpoints

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = torch.cuda.get_rng_state(self.env.device) if self.env.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _save(self) -> str:
        """Write ckpt_<step> (rank 0), update ``latest``, rotate. Collective: every rank calls it."""
        rng = D.all_gather_object(self.env, self._rng_state())

        def write():
            tensors: dict[str, torch.Tensor] = {}
            tensors.update(add_prefix(self.model.state_dict(), "model/"))
            tensors.update(add_prefix(self.ema.state_dict(), "ema/"))
            opt_tensors, opt_meta = optimizer_tensors(self.optimizer, self.param_names)
            tensors.update(add_prefix(opt_tensors, "optim/"))
            bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:  # cannot happen with the skip guard; never persist NaNs
                raise NonFiniteLossError(f"refusing to write a checkpoint with non-finite values in {bad[:3]}")
            for r, (cpu, cuda) in enumerate(rng):
                tensors[f"rng/cpu/{r}"] = cpu
                if cuda is not None:
                    tensors[f"rng/cuda/{r}"] = cuda
            tensors.update(add_prefix(self.t_sampler.state_tensors(), "tsampler/"))
            scaler = self.precision.scaler
            meta = {
                "config": self.cfg.to_dict(),
                "step": self.step,
                "version": __version__,
                "kind": "train",
                "optimizer": opt_meta,
                "data_sampler": self.batches.state_dict(),
                "t_sampler": self.cfg.train.t_sampler,
                "skipped_nonfinite": self.skipped,
                "nonfinite_in_row": self.in_row,
                "world_size": self.env.world_size,
                "precision": self.precision.name,
                "grad_scaler": scaler.state_dict() if scaler is not None else None,
            }
            path = self.run_dir.checkpoint_path(self.step)
            try:
                save_checkpoint(path, tensors, meta)
                self.run_dir.set_latest(path)
                gone = self.run_dir.rotate(self.cfg.train.keep_last)
            except CheckpointError as e:
                raise CheckpointError(f"stopping: {e}") from None
            except OSError as e:
                raise CheckpointError(f"stopping: could not update {self.run_dir.ckpt_dir}: "
                                      f"{e.strerror or e}") from None
            for g in gone:
                self.log(f"removed old checkpoint {g.name} (keep_last={self.cfg.train.keep_last})")
            return str(path)

        return _rank0(self.env, write)

    # ------------------------------------------------------------------------------------ loop

    def _draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """t int64 [B], weights float32 [B], noise float32 [B, C, H, W] for the global batch of ``step``."""
        cfg, dev = self.cfg, self.env.device
        self.g_t.manual_seed(stream_seed(cfg.train.seed, step, _T_STREAM))
        t, w = self.t_sampler.sample(cfg.train.batch_size, self.g_t)
        self.g_noise.manual_seed(stream_seed(cfg.train.seed, step, _NOISE_STREAM))
        shape = (cfg.train.batch_size, cfg.model.in_channels, cfg.model.resolution, cfg.model.resolution)
        noise = torch.randn(shape, generator=self.g_noise, device=dev)
        return t, w, noise

    def _one_step(self) -> tuple[bool, torch.Tensor, float]:
        """Forward/backward over the micro-batches, clip, and (if finite) update. Returns
        (applied, global stats [10] on CPU, grad norm)."""
        from ..images import to_model

        cfg, env, dev, prec = self.cfg, self.env, self.env.device, self.precision
        A, m = cfg.train.grad_accum, self.micro_batch
        lr = warmup_lr(self.step, cfg.train.lr, cfg.train.warmup_steps)
        set_lr(self.optimizer, lr)
        self.lr = lr
        t_all, w_all, noise_all = self._draw(self.step)
        lo, hi = env.rank * self.local_batch, (env.rank + 1) * self.local_batch
        t, w, noise = t_all[lo:hi].to(dev), w_all[lo:hi].to(dev), noise_all[lo:hi]
        x0 = to_model(self.batches.next(), dev)
        if cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
            noise = noise.contiguous(memory_format=torch.channels_last)

        self.optimizer.zero_grad(set_to_none=True)
        stats = torch.zeros(2 + 8, dtype=torch.float64, device=dev)
        local_losses = []
        for a in range(A):
            sl = slice(a * m, (a + 1) * m)
            sync = contextlib.nullcontext() if (not env.distributed or a == A - 1) else self.train_model.no_sync()
            with sync:
                with prec.autocast():
                    losses = self.diffusion.training_losses(self.train_model, x0[sl], t[sl], noise=noise[sl])
                losses = losses.float()
                loss = (losses * w[sl]).mean() / A
                (prec.scaler.scale(loss) if prec.scaler is not None else loss).backward()
            stats += batch_stats(losses, t[sl], self.T)
            local_losses.append(losses.detach())
        D.all_reduce_sum(env, stats)
        if prec.scaler is not None:
            prec.scaler.unscale_(self.optimizer)
        norm = grad_norm_and_clip(self.params, cfg.train.grad_clip)
        # One host sync per step: the global loss and the (rank-identical) gradient norm.
        host = torch.cat([stats, norm.detach().double().reshape(1)]).cpu()
        grad_norm = float(host[-1])
        finite = math.isfinite(float(host[0])) and math.isfinite(grad_norm)
        apply_update(self.optimizer, prec.scaler, finite)
        if finite:
            self.ema.update(self.model)
            if cfg.train.t_sampler == "importance":
                losses_all = D.all_gather_tensor(env, torch.cat(local_losses)).cpu()
                self.t_sampler.update(t_all, losses_all)
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return finite, host[:-1], grad_norm

    def run(self, resume: str | None) -> dict:
        cfg, env, tc = self.cfg, self.env, self.cfg.train
        path, tensors, meta = self._choose_start(resume)
        self._build()
        self._open_data()
        self.step, self.skipped, self.in_row = 0, 0, 0
        last_ckpt: str | None = None
        if path is not None:
            self._restore(path, tensors, meta)
            last_ckpt = path
            del tensors
        else:
            self._seed_dropout()

        self.train_model: torch.nn.Module = self.model
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model = DDP(self.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                   broadcast_buffers=False)
        if tc.compile:
            self.train_model = torch.compile(self.train_model)
        self.model.train()
        self.g_t = torch.Generator(device="cpu")
        self.g_noise = torch.Generator(device=env.device)

        writer = None
        if env.is_main:
            self.run_dir.root.mkdir(parents=True, exist_ok=True)
            self.run_dir.write_config(cfg)
            if path is None:
                self.run_dir.metrics_path.unlink(missing_ok=True)
            else:
                self.run_dir.truncate_metrics(self.step)
            writer = MetricsWriter(self.run_dir.metrics_path, self.run_dir.root / "tb")
            self.log(f"training {cfg.preset}: {sum(p.numel() for p in self.params):,} parameters on {env.device} "
                     f"({self.precision.name}), steps {self.step} -> {tc.total_steps}, run folder {self.run_dir.root}")
        D.barrier(env)

        if self.step >= tc.total_steps:
            self.log(f"already at step {self.step} >= train.total_steps={tc.total_steps}; nothing to do "
                     f"(raise train.total_steps to train longer)")
        window = Window(self.T)
        self.bar = Progress(self.show_progress, self.step, tc.total_steps)
        self.lr = warmup_lr(self.step, tc.lr, tc.warmup_steps)
        start_step, t_start = self.step, time.perf_counter()
        last_loss = None
        shown_loss = None
        # Kept open for the whole run: its scratch memory is allocated once, not at every step.
        # Not under torch.compile, which compiles the direct convolution.
        wino = winograd_convs(self.model, enabled=tc.winograd and not tc.compile, autograd=True)
        wino.__enter__()
        try:
            while self.step < tc.total_steps:
                applied, stats, grad_norm = self._one_step()
                self.step += 1
                window.tick(tc.batch_size)
                if applied:
                    self.in_row = 0
                    window.add(stats.tolist(), grad_norm)
                    step_loss = float(stats[0] / stats[1])
                    shown_loss = step_loss if shown_loss is None else 0.9 * shown_loss + 0.1 * step_loss
                else:
                    self.skipped += 1
                    self.in_row += 1
                    self.log(f"step {self.step}: non-finite loss or gradient norm (loss sum {float(stats[0])}, "
                             f"grad norm {grad_norm}); step skipped ({self.in_row} in a row, "
                             f"{self.skipped} in total)")
                    if self.in_row >= tc.max_nonfinite_in_row:
                        raise NonFiniteLossError(
                            f"training diverged: {self.in_row} non-finite losses/gradients in a row at step "
                            f"{self.step} (train.max_nonfinite_in_row={tc.max_nonfinite_in_row}); no checkpoint "
                            f"was written with these values. Resume from the last checkpoint "
                            f"({last_ckpt or 'none'}) with a lower train.lr or train.precision=fp32")
                self.bar.update()
                if self.step % 10 == 0 or self.step == tc.total_steps:
                    self.bar.set_loss(shown_loss, self.skipped)
                if tc.log_every and self.step % tc.log_every == 0:
                    rec = window.record(self.step, self.lr, self.skipped, time.perf_counter() - t_start)
                    last_loss = rec["loss"]
                    if writer is not None:
                        writer.write(rec)
                    window.reset()
                if tc.sample_every and self.step % tc.sample_every == 0 and env.is_main:
                    self._sample_grid()
                if (tc.save_every and self.step % tc.save_every == 0) or self.step == tc.total_steps:
                    last_ckpt = self._save()
        finally:
            wino.__exit__(None, None, None)
            self.bar.close()
            self.batches.close()
            if writer is not None:
                writer.close()
        elapsed = time.perf_counter() - t_start
        done = self.step - start_step
        if last_loss is None and window.count:
            last_loss = window.loss_sum / window.count
        self.log(f"finished at step {self.step}: {done} steps in {elapsed:.1f}s"
                 + (f" ({done / elapsed:.2f} steps/s)" if done and elapsed > 0 else "")
                 + (f"; {self.skipped} non-finite steps skipped" if self.skipped else "")
                 + (f"; checkpoint {last_ckpt}" if last_ckpt else ""))
        return {"step": self.step, "checkpoint": last_ckpt, "run_dir": str(self.run_dir.root),
                "skipped_nonfinite": self.skipped, "loss": last_loss,
                "steps_per_s": done / elapsed if done and elapsed > 0 else None,
                "rank": env.rank, "world_size": env.world_size}

    def _sample_grid(self) -> None:
        """EMA samples with fixed seeds; the training RNG streams are left exactly as they were."""
        path = self.run_dir.sample_path(self.step)
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            write_sample_grid(path, self.diffusion, self.ema.module, self.cfg, self.env.device, self.precision.dtype)
        self.log(f"step {self.step}: samples -> {path}")
