"""The trainer: ``train(cfg, out_dir, resume=None)`` (paper Appendix B).

``train`` takes the run folder's writer lock (:mod:`.lock`), turns SIGINT/SIGTERM into a
graceful stop (:mod:`.stop`), builds the parts, restores a checkpoint if asked, and then runs
one :func:`~ddpm.training.step.train_step` per batch. After each step it logs, samples and
checkpoints on the configured cadence (every ``train.save_every`` steps, every
``train.save_every_minutes`` minutes, at the end), and on a stop signal it checkpoints the step
just finished and returns. What a checkpoint holds is :mod:`.layout`'s business.

Determinism: dropout draws from the global torch RNG, whose state (per rank, CPU and CUDA) is
checkpointed along with the model, EMA, Adam moments, data position and t-sampler history. On a
CPU, N steps in one go and N/2 + resume + N/2 give bit-identical weights, whether the first
half ended on its own, by a graceful stop, or by a crash after a checkpoint.

The step counter counts consumed batches, including skipped non-finite steps; Adam's own step
count only counts applied updates. After train.max_nonfinite_in_row skipped steps in a row the
run stops without writing a checkpoint.

No host round trip between log lines: a step only queues device work (:mod:`.step`); its
loss statistics, gradient norm and guard flag stay on the device until the loop reads the
whole window at once, every ``train.log_every`` steps and before a checkpoint or a stop
(:mod:`.hostsync` names every such read). Skipped steps are therefore reported, and a diverged
run stopped, at the next such read rather than at the step itself; skipped steps change
nothing, so what is saved is the same.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed as D
from ..atomic import remove_stale_temps
from ..checkpoint import load_checkpoint, save_checkpoint
from ..config import Config
from ..diskspace import check_room, checkpoint_bytes
from ..errors import CheckpointError, ConfigError, DataError, UserError
from .. import netpath
from ..winograd import winograd_convs
from . import layout
from .ema import EMA
from .hostsync import host_reads
from .lock import RunLock, RunLockedError
from .grids import score_grid, shows_raw, write_sample_grid
from .observe import LiveReport, MetricsWriter, Progress, Window
from .oom import SplitOnOOM
from .optim import make_optimizer
from .precision import resolve_precision
from .state import (RunFolder, check_resume_compatible, check_train_meta, find_resume_checkpoint, refuse_overwrite,
                    step_of)
from .step import DROPOUT_STREAM, INIT_STREAM, Batch, TrainParts, stream_seed, train_step
from .stop import Interrupted, StopSignals
from .tsampler import make_t_sampler

__all__ = ["train", "NonFiniteLossError", "stream_seed"]

# With train.log_every=0 the step records are still read (and memory bounded) this often.
MAX_PENDING = 1000


class NonFiniteLossError(UserError):
    """Too many non-finite losses/gradients in a row: the run diverged."""


def train(cfg: Config, out_dir: str | Path, resume: str | None = None, device: str | None = None,
          progress: bool = True, log: Callable[[str], Any] = print) -> dict:
    """Train ``cfg`` into the run folder ``out_dir``.

    Args:
        cfg: the resolved config (validated here).
        out_dir: run folder; created if missing. Only one trainer at a time may use it.
        resume: ``None`` for a fresh run (refused if ``out_dir`` already holds checkpoints),
            ``"auto"`` for the newest readable checkpoint in ``out_dir`` (a fresh run if there is
            none), or the path of a checkpoint file.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default CUDA when available (under torchrun
            ``cuda:LOCAL_RANK``).
        progress: show a tqdm bar (rank 0).
        log: where messages go (rank 0).
    Returns:
        {"step", "checkpoint" (str or None), "run_dir", "skipped_nonfinite", "loss" (last window
        mean or None), "steps_per_s" (this session), "rank", "world_size", "stopped_by" (the
        signal number that stopped the run early, or None)}.
    Raises:
        UserError subclasses for configuration, data, checkpoint, divergence and lock problems
        (:class:`~ddpm.training.lock.RunLockedError` when another trainer holds the folder);
        :class:`~ddpm.training.stop.Aborted` (a KeyboardInterrupt) on a second stop signal.
    """
    cfg = cfg.validate()
    env = D.setup(device)
    ok = False
    try:
        with contextlib.ExitStack() as stack:
            lock = RunLock(out_dir) if env.is_main else None
            _rank0(env, lambda: lock.acquire() and None)
            if lock is not None:
                stack.callback(lock.release)
            stop = stack.enter_context(StopSignals())
            result = _Trainer(cfg, Path(out_dir), env, progress, log, stop).run(resume)
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
    result, err = D.broadcast_object((result, err))
    if err is not None:
        classes = (UserError, ConfigError, CheckpointError, NonFiniteLossError, RunLockedError)
        raise {c.__name__: c for c in classes}.get(err[0], UserError)(err[1])
    return result


class _Trainer:
    def __init__(self, cfg: Config, out_dir: Path, env: D.DistEnv, progress: bool, log: Callable[[str], Any],
                 stop: StopSignals):
        self.cfg, self.env, self.stop = cfg, env, stop
        self.run_dir = RunFolder(out_dir)
        self.show_progress = progress and env.is_main
        self._log = log
        self.bar: Progress | None = None
        tc = cfg.train
        if tc.batch_size % (env.world_size * tc.grad_accum) != 0:
            raise ConfigError(f"invalid value for train.batch_size: {tc.batch_size}; expected a multiple of "
                              f"world_size×grad_accum = {env.world_size}×{tc.grad_accum}")

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

    def _build(self) -> TrainParts:
        from ..diffusion import GaussianDiffusion
        from ..nets.unet import UNet

        cfg, env = self.cfg, self.env
        # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
        torch.manual_seed(stream_seed(cfg.train.seed, 0, INIT_STREAM))
        model = UNet.from_config(cfg.model, cfg.out_channels).to(env.device)
        # One layout and routing for every rank: rank 0's (timed on the CPU; cached per machine).
        path = netpath.for_training(cfg, model.train(), env.device, env.world_size) if env.rank == 0 else None
        path = D.broadcast_object(path)
        self.path = path
        nhwc = path.channels_last
        if nhwc:
            model = model.to(memory_format=torch.channels_last)
        diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        return TrainParts(cfg=cfg, model=model, train_model=model, diffusion=diffusion,
                          ema=EMA(model, cfg.train.ema_decay),
                          optimizer=make_optimizer(list(model.parameters()), cfg.train, env.device),
                          t_sampler=make_t_sampler(cfg.train.t_sampler, int(diffusion.num_timesteps)),
                          precision=resolve_precision(cfg.train.precision, env.device),
                          device=env.device, rank=env.rank, world_size=env.world_size, channels_last=nhwc,
                          winograd=path.winograd)

    def _wrap(self, parts: TrainParts) -> None:
        """DDP and/or torch.compile around the raw network, for the forward/backward pass only."""
        env, tc = self.env, self.cfg.train
        if env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            parts.train_model = DDP(parts.model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                    broadcast_buffers=False)
        if tc.compile:
            parts.train_model = torch.compile(parts.train_model)
        parts.model.train()
        self.graph = None
        if tc.cuda_graph:
            from .graphstep import StepGraph

            self.graph = StepGraph(parts)  # captured at its first call (after a few undone warm-up steps)

    def _open_data(self):
        from ..data import open_dataset
        from .batches import BatchSource

        cfg, env = self.cfg, self.env
        local = cfg.train.batch_size // env.world_size
        ds = open_dataset(cfg.data.source, "train", cfg.model.resolution, cfg.model.in_channels,
                          cfg.data.skip_bad_images, self.log)
        labels = self._class_labels(ds) if cfg.model.num_classes > 0 else None
        batches = BatchSource(ds, cfg.train.batch_size, cfg.train.seed, cfg.data.random_flip,
                              env.rank, env.world_size, cfg.train.num_workers, pin_memory=env.device.type == "cuda",
                              labels=labels)
        self._data_on_device(batches, ds)
        self.log(f"data: {cfg.data.source}: {len(ds)} images; global batch {cfg.train.batch_size} = "
                 f"{env.world_size} process(es) × {local}"
                 + (f" ({cfg.train.grad_accum} micro-batches of {local // cfg.train.grad_accum})"
                    if cfg.train.grad_accum > 1 else ""))
        return batches

    def _data_on_device(self, batches, ds) -> None:
        """``train.data_on_device``: keep the uint8 training set on the device (auto: on CUDA when it fits)."""
        from .batches import data_fits_on_device

        cfg, dev = self.cfg, self.env.device
        nbytes = len(ds) * cfg.model.resolution ** 2 * cfg.model.in_channels
        setting = cfg.train.data_on_device
        if setting is True or (setting == "auto" and data_fits_on_device(nbytes, dev)):
            batches.put_on_device(dev)
            self.log(f"data: the training set is kept on {dev} ({nbytes / 2 ** 20:.1f} MiB as uint8)")

    def _class_labels(self, ds):
        """A conditional run's labels (DataError if the data has none or one is out of range); the
        class names (the data's, e.g. sorted subfolders, else "0", "1", ...) go into the run's
        config (``data.class_names``) and are printed."""
        from dataclasses import replace

        from ..conditioning import dataset_labels

        cfg = self.cfg
        labels = dataset_labels(ds, cfg.model.num_classes, cfg.data.source)
        names = ds.class_names or cfg.data.class_names or tuple(str(k) for k in range(cfg.model.num_classes))
        if tuple(names) != tuple(cfg.data.class_names):
            self.cfg = self.parts.cfg = replace(cfg, data=replace(cfg.data, class_names=tuple(names)))
        self.log(f"classes: {len(names)} ({', '.join(f'{k}={n}' for k, n in enumerate(names))}); "
                 f"label dropout train.p_uncond={cfg.train.p_uncond}")
        return labels

    def _restore(self, parts: TrainParts, batches, path: str, tensors: dict, meta: dict) -> layout.Counters:
        old = Config.from_dict(meta["config"])
        for k, a, b in check_resume_compatible(old, self.cfg, Path(path)):
            self.log(f"resume: {k} changes from {a!r} to {b!r}")
        counters, data_state, rng_restored = layout.unpack(parts, tensors, meta, path)
        batches.load_state_dict(data_state)
        if not rng_restored:
            self.log(f"resume: the checkpoint was written by {meta.get('world_size', 1)} process(es), now "
                     f"{self.env.world_size}; dropout randomness restarts from a fresh seed (the data order "
                     f"and t/noise draws are unaffected)")
            self._seed_dropout(counters.step)
        self.log(f"resumed from {path} at step {counters.step}")
        return counters

    def _seed_dropout(self, step: int) -> None:
        torch.manual_seed(stream_seed(self.cfg.train.seed, step, self.env.rank, DROPOUT_STREAM))

    def _open_outputs(self, resumed: bool, counters: layout.Counters, parts: TrainParts) -> MetricsWriter | None:
        """Rank 0: config.json, metrics.jsonl (cut back to the resumed step), the start line."""
        if not self.env.is_main:
            return None
        run, tc = self.run_dir, self.cfg.train
        run.root.mkdir(parents=True, exist_ok=True)
        for folder in (run.root, run.ckpt_dir, run.samples_dir):
            for p in remove_stale_temps(folder):  # left by a killed writer; we hold the lock
                self.log(f"removed {p} (an unfinished write of a killed run)")
        run.write_config(self.cfg)
        if resumed:
            run.truncate_metrics(counters.step)
        else:
            run.metrics_path.unlink(missing_ok=True)
        layout_name = "NHWC" if parts.channels_last else "NCHW"
        if getattr(self, "path", None) is not None and self.path.seconds:
            self.log(self.path.describe())  # what was timed for this run's layout and routing
        self.log(f"training {self.cfg.preset}: {sum(p.numel() for p in parts.params):,} parameters on "
                 f"{self.env.device} ({parts.precision.name}, {layout_name}), steps {counters.step} -> "
                 f"{tc.total_steps}, run folder {run.root}")
        return MetricsWriter(run.metrics_path, run.root / "tb")

    # ------------------------------------------------------------------------------------ checkpoints

    def _save(self, parts: TrainParts, batches, counters: layout.Counters) -> str:
        """Write ckpt_<step> (rank 0), update ``latest``, rotate. Collective: every rank calls it."""
        rng = D.all_gather_object(layout.rng_state(self.env.device))

        def write():
            tensors, meta = layout.pack(parts, counters, batches.state_dict(), rng)
            bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
            if bad:  # cannot happen with the skip guard; never persist NaNs
                raise NonFiniteLossError(f"refusing to write a checkpoint with non-finite values in {bad[:3]}")
            path = self.run_dir.checkpoint_path(counters.step)
            check_room(path.parent, checkpoint_bytes(tensors), f"checkpoint {path.name}", self.log)
            try:
                save_checkpoint(path, tensors, meta)
                self.run_dir.set_latest(path)
                gone = self.run_dir.rotate(self.cfg.train.keep_last)
            except CheckpointError as e:
                hint = (f"; continue with ddpm train --out {self.run_dir.root} --resume auto once there is space"
                        if any(w in str(e).lower() for w in ("no space left", "quota exceeded")) else "")
                raise CheckpointError(f"stopping: {e}{hint}") from None
            except OSError as e:
                raise CheckpointError(f"stopping: could not update {self.run_dir.ckpt_dir}: "
                                      f"{e.strerror or e}") from None
            for g in gone:
                self.log(f"removed old checkpoint {g.name} (keep_last={self.cfg.train.keep_last})")
            check_room(path.parent, path.stat().st_size, "the next checkpoint", self.log)  # warn early
            return str(path)

        return _rank0(self.env, write)

    def _poll(self, last_save: float) -> tuple[int, bool]:
        """(stop signal number or 0, a time-based checkpoint is due), the same on every rank."""
        minutes = self.cfg.train.save_every_minutes
        sig = self.stop.signum or 0
        due = minutes > 0 and time.monotonic() - last_save >= 60.0 * minutes
        if self.env.distributed:  # any rank's signal stops all of them at this same step
            with host_reads("stop"):  # one small read per step, under torchrun only
                flags = torch.tensor([sig, int(due)], dtype=torch.int64, device=self.env.device)
                D.all_reduce_max(flags)
                sig, due = int(flags[0]), bool(flags[1])
        return sig, due

    # ------------------------------------------------------------------------------------ loop

    def run(self, resume: str | None) -> dict:
        tc, env = self.cfg.train, self.env
        with host_reads("setup"):
            path, tensors, meta = self._choose_start(resume)
            parts = self.parts = self._build()
            batches = self.batches = self._open_data()
            if path is not None:
                counters = self._restore(parts, batches, path, tensors, meta)
                del tensors
            else:
                counters = layout.Counters()
                self._seed_dropout(0)
            self._wrap(parts)
            writer = self._open_outputs(path is not None, counters, parts)
            D.barrier()
        if counters.step >= tc.total_steps:
            self.log(f"already at step {counters.step} >= train.total_steps={tc.total_steps}; nothing to do "
                     f"(raise train.total_steps to train longer)")
        last_ckpt, saved_step, last_save = path, (counters.step if path else None), time.monotonic()
        start_step, t_start = counters.step, time.perf_counter()
        window = Window(int(parts.diffusion.num_timesteps))
        shown = {"loss": None, "last": None}
        pending: list[tuple[int, float, torch.Tensor]] = []  # (step, lr, StepResult.record()) not yet read
        stopped_by = 0
        report = LiveReport(self.run_dir.root, tc.report_every, self.log) if env.is_main else None
        # a batch that runs out of device memory is split into micro-batches (ddpm.training.oom)
        step_fn = SplitOnOOM(lambda p, b, s: train_step(p, b, s), self.log, env.world_size)
        with contextlib.ExitStack() as stack:
            # Kept open for the whole run: its scratch memory is allocated once, not at every step.
            # Not under torch.compile, which compiles the direct convolution.
            stack.enter_context(winograd_convs(parts.model, enabled=parts.winograd and not tc.compile, autograd=True))
            self.bar = Progress(self.show_progress, counters.step, tc.total_steps)
            stack.callback(self.bar.close)
            stack.callback(batches.close)
            if writer is not None:
                stack.callback(writer.close)
            stopped_by = self._poll(last_save)[0] if counters.step < tc.total_steps else 0
            while counters.step < tc.total_steps and not stopped_by:
                try:
                    x0, kwargs = self._next_batch(batches)
                except DataError as e:  # the data changed under the run: keep the finished steps
                    raise self._data_failed(e, parts, batches, counters, saved_step, last_ckpt) from None
                if self.graph is not None:
                    result = self.graph(Batch(x0, kwargs), counters.step)
                else:
                    result = step_fn(parts, Batch(x0, kwargs), counters.step)
                counters.step += 1
                pending.append((counters.step, result.lr, result.record()))
                window.tick(tc.batch_size)
                self.bar.update()
                if tc.sample_every and counters.step % tc.sample_every == 0 and env.is_main:
                    with host_reads("samples"):  # before the log: the grid's score joins its record
                        self._sample_grid(parts, counters.step, writer)
                log_now = bool(tc.log_every and counters.step % tc.log_every == 0)
                if log_now or len(pending) >= MAX_PENDING:
                    self._flush(pending, counters, window, shown, last_ckpt)
                if log_now:
                    rec = window.record(counters.step, result.lr, counters.skipped, time.perf_counter() - t_start)
                    if self.cfg.data.skip_bad_images:  # bad image files skipped so far (this process)
                        rec["skipped_images"] = self.batches.skipped_images
                    rec.update(self.__dict__.pop("grid_score", None) or {})
                    shown["last"] = rec["loss"]
                    if writer is not None:
                        writer.write(rec)
                    window.reset()
                stopped_by, time_due = self._poll(last_save)  # after sampling: a signal during it stops here
                if (stopped_by or time_due or counters.step == tc.total_steps
                        or (tc.save_every and counters.step % tc.save_every == 0)):
                    self._flush(pending, counters, window, shown, last_ckpt)  # counters first, then save
                    if saved_step != counters.step:
                        with host_reads("checkpoint"):
                            last_ckpt, saved_step = self._save(parts, batches, counters), counters.step
                        last_save = time.monotonic()
                    if not stopped_by:  # a signal that came during this write: its step is saved, stop now
                        stopped_by = self._poll(last_save)[0]
                if report is not None and report.due():
                    report.write(live=True)
            if report is not None:
                report.write(live=False)  # the run's final state (finished, or stopped by a signal)
        elapsed = time.perf_counter() - t_start
        done = counters.step - start_step
        last_loss = shown["last"]
        if last_loss is None and window.count:
            last_loss = window.loss_sum / window.count
        if stopped_by:
            self.log(f"stopped at step {counters.step} ({signal.Signals(stopped_by).name}): "
                     + (f"checkpoint {last_ckpt}; continue with ddpm train --out {self.run_dir.root} --resume auto"
                        if last_ckpt else "no checkpoint (no step was taken)"))
        else:
            self.log(f"finished at step {counters.step}: {done} steps in {elapsed:.1f}s"
                     + (f" ({done / elapsed:.2f} steps/s)" if done and elapsed > 0 else "")
                     + (f"; {counters.skipped} non-finite steps skipped" if counters.skipped else "")
                     + (f"; checkpoint {last_ckpt}" if last_ckpt else ""))
        return {"step": counters.step, "checkpoint": last_ckpt, "run_dir": str(self.run_dir.root),
                "skipped_nonfinite": counters.skipped, "loss": last_loss,
                "steps_per_s": done / elapsed if done and elapsed > 0 else None,
                "rank": env.rank, "world_size": env.world_size, "stopped_by": stopped_by or None}

    def _data_failed(self, e: DataError, parts: TrainParts, batches, counters: layout.Counters,
                     saved_step: int | None, last_ckpt: str | None) -> DataError:
        """A batch could not be read (a file deleted, truncated or replaced during the run): write
        a checkpoint of the last finished step (one process only: a collective save would wait for
        ranks that did not fail) and return the error to raise, saying how to continue."""
        if not self.env.distributed and counters.step > 0 and saved_step != counters.step:
            last_ckpt = self._save(parts, batches, counters)
        where = (f"; checkpoint {last_ckpt} (step {counters.step}); fix or remove the file (or set "
                 f"data.skip_bad_images=true) and continue with ddpm train --out {self.run_dir.root} --resume auto"
                 if last_ckpt else "")
        return DataError(f"stopping at step {counters.step}: {e}{where}")

    def _next_batch(self, batches) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This rank's next batch on the device: x0 float32 [b, C, H, W] and the model kwargs.
        Host batches reach a GPU by an asynchronous copy from pinned memory (a plain copy from
        pageable memory would wait for the device)."""
        from ..images import to_model

        from .batches import to_device_async

        dev = self.env.device
        images = to_device_async(batches.next(), dev)
        labels = batches.last_labels
        kwargs = {} if labels is None else {"y": to_device_async(labels, dev)}
        return to_model(images), kwargs

    def _flush(self, pending: list, counters: layout.Counters, window: Window, shown: dict,
               last_ckpt: str | None) -> None:
        """Read the pending step records (the loop's one host read per window) and book them."""
        if pending:
            with host_reads("window"):
                self._account(pending, counters, window, shown, last_ckpt)
            pending.clear()

    def _account(self, pending: list[tuple[int, float, torch.Tensor]], counters: layout.Counters, window: Window,
                 shown: dict, last_ckpt: str | None) -> None:
        """Book the finished steps of ``pending`` (one host read for all): non-finite guard,
        progress bar, the window's sums."""
        if not pending:
            return
        tc = self.cfg.train
        rows = torch.stack([r for _, _, r in pending]).tolist()
        for (step, _lr, _), row in zip(pending, rows):
            stats, grad_norm, applied = row[:10], row[10], row[11] > 0.5
            if applied:
                counters.in_row = 0
                window.add(stats, grad_norm)
                loss = stats[0] / stats[1]
                shown["loss"] = loss if shown["loss"] is None else 0.9 * shown["loss"] + 0.1 * loss
                continue
            counters.skipped += 1
            counters.in_row += 1
            self.log(f"step {step}: non-finite loss or gradient norm (loss sum {stats[0]}, "
                     f"grad norm {grad_norm}); step skipped ({counters.in_row} in a row, "
                     f"{counters.skipped} in total)")
            if counters.in_row >= tc.max_nonfinite_in_row:
                raise NonFiniteLossError(
                    f"training diverged: {counters.in_row} non-finite losses/gradients in a row at step "
                    f"{step} (train.max_nonfinite_in_row={tc.max_nonfinite_in_row}); no checkpoint "
                    f"was written with these values. Resume from the last checkpoint "
                    f"({last_ckpt or 'none'}) with a lower train.lr or train.precision=fp32")
        self.bar.set_loss(shown["loss"], counters.skipped)

    def _sample_grid(self, parts: TrainParts, step: int, writer: MetricsWriter | None = None) -> None:
        """EMA samples with fixed seeds (early on also the raw weights', :mod:`.grids`); the training
        RNG streams are left exactly as they were. A stop signal cuts the sampling short (no file
        is written for this step)."""
        path = self.run_dir.sample_path(step)
        devices = [self.env.device] if self.env.device.type == "cuda" else []
        raw = parts.model if shows_raw(self.cfg, step) else None
        try:
            with self.stop.interruptible(), torch.random.fork_rng(devices=devices):
                u8 = write_sample_grid(path, parts.diffusion, parts.ema.module, self.cfg, self.env.device,
                                       parts.precision.dtype, raw_model=raw)
        except Interrupted:
            self.log(f"step {step}: sample grid skipped (stopping)")
            return
        score = score_grid(self.cfg, u8)  # quality against time where a scorer exists (digits)
        if score is not None:
            self.grid_score = {"grid_step": step, **score}  # written with the next metrics record
        self.log(f"step {step}: samples -> {path}" + (" (left EMA, right the raw weights)" if raw is not None else "")
                 + (f"; digits Fréchet distance of these {score['grid_n']} {score['grid_fd']:.3g}" if score else ""))
        if writer is not None:
            writer.add_grid(path, step)
