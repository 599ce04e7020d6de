"""The progressive distillation driver: ``distill(teacher, out_dir, settings)``.

Salimans & Ho, ICLR 2022, Algorithm 2: the student starts as a copy of the teacher, learns to
take one step where the teacher takes two (:mod:`.phase`), then becomes the teacher of the next
phase, until the chain has ``settings.steps`` steps. The student predicts v (section 4); an eps
teacher's weights are its initial v network (:mod:`.settings` on why).

The run folder (:mod:`.files`) is held with the trainer's writer lock (``training.lock``);
SIGINT/SIGTERM stop after the step in flight with a checkpoint of it (``training.stop``); what a
checkpoint holds is ``training.layout``'s (student, EMA, Adam, every RNG, data position) plus
meta["distill"] (phase, step in it). Resuming re-creates the phase's teacher from the previous
phase's student file and continues bit-identically; calling again with a smaller ``steps``
appends phases to a finished run.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import distributed as D
from ..atomic import atomic_write_json, remove_stale_temps
from ..checkpoint import save_checkpoint
from ..config import Config
from ..errors import CheckpointError, UserError
from ..training import layout
from ..training.ema import EMA
from ..training.lock import RunLock
from ..training.observe import Progress
from ..training.optim import make_optimizer
from ..training.precision import resolve_precision
from ..training.state import RunFolder, find_resume_checkpoint
from ..training.step import DROPOUT_STREAM, Batch, TrainParts, stream_seed
from ..training.stop import StopSignals
from ..training.tsampler import make_t_sampler
from ..weights import load_state_strict
from . import files
from .phase import Phase, distill_step
from .settings import RESUMABLE, DistillSettings, phases, student_config


def distill(teacher: str | Path, out_dir: str | Path, settings: DistillSettings, device: str | None = None,
            progress: bool = True, log: Callable[[str], Any] = print) -> dict:
    """Distil ``teacher`` (checkpoint file or run folder) into ``out_dir``; continue if it exists.

    Returns {"steps" (the last finished student's step count or None), "student" (its file),
    "global_step", "stopped_by" (signal number or None), "seconds", "optimizer_steps" (this call)}.
    Raises UserError subclasses (teacher not found, settings that differ from the run's, lock).
    """
    env = D.setup(device)
    with contextlib.ExitStack() as stack:
        lock = RunLock(out_dir).acquire()
        stack.callback(lock.release)
        stop = stack.enter_context(StopSignals())
        return _Distiller(Path(out_dir), settings, env.device, progress, log, stop).run(teacher)


def _load_teacher(path: str | Path) -> tuple[Path, dict, Config, dict]:
    from ..api import load_weights

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"--ckpt {path}: no such checkpoint file or run folder")
    if files.is_distilled_run(p):
        raise CheckpointError(f"--ckpt {path}: a distillation run; distil further with ddpm distill --out {path} "
                              f"--steps K")
    return load_weights(p, "ema")


class _Distiller:
    def __init__(self, root: Path, settings: DistillSettings, device: torch.device, progress: bool,
                 log: Callable[[str], Any], stop: StopSignals):
        self.run_dir, self.settings, self.device, self.stop = RunFolder(root), settings, device, stop
        self.progress, self._log, self.bar = progress, log, None

    def log(self, msg: str) -> None:
        if self.bar is None or not self.bar.write(msg):
            self._log(msg)

    # ------------------------------------------------------------------------------------ setup
    def _open(self, teacher: str | Path) -> tuple[Config, Config, list[Phase]]:
        """Teacher copy and distill.json on a fresh run; the stored ones (checked) on a resumed one."""
        root = self.run_dir.root
        info_path = root / files.INFO
        if info_path.is_file():
            info = files.read_info(root)
            old = DistillSettings.from_dict(info["settings"])
            bad = [f"{k}: run {a!r}, now {b!r}" for k, a, b in
                   ((k, getattr(old, k), getattr(self.settings, k)) for k in old.to_dict()) if a != b
                   and k not in RESUMABLE]
            if bad:
                raise UserError(f"--out {root}: this distillation was started with other settings ({'; '.join(bad)}); "
                                f"continue it with the same ones or choose another --out")
            _, _, tcfg, _ = _load_teacher(root / files.TEACHER)
            self.log(f"continuing the distillation in {root} (teacher {info['teacher']})")
        else:
            if self.run_dir.checkpoints():
                raise UserError(f"--out {root}: holds checkpoints but no {files.INFO}; not a distillation run, "
                                f"choose another --out")
            src, state, tcfg, meta = _load_teacher(teacher)
            root.mkdir(parents=True, exist_ok=True)
            files.save_teacher(root / files.TEACHER, state, tcfg, str(src), meta)
            info = {"teacher": str(src), "num_timesteps": tcfg.diffusion.num_timesteps,
                    "settings": self.settings.to_dict()}
        atomic_write_json(info_path, {**info, "settings": self.settings.to_dict()})
        self.teacher_source = str(info["teacher"])
        scfg = student_config(tcfg, self.settings)
        self.run_dir.write_config(scfg)
        for folder in (root, self.run_dir.ckpt_dir, root / files.STUDENTS):
            for p in remove_stale_temps(folder) if folder.is_dir() else []:
                self.log(f"removed {p} (an unfinished write of a killed run)")
        return tcfg, scfg, phases(self.settings, tcfg.diffusion.num_timesteps)

    def _network(self, cfg: Config, state: dict, where: Path) -> torch.nn.Module:
        from ..nets.unet import UNet

        net = UNet.from_config(cfg.model, cfg.out_channels)
        load_state_strict(net, state, where)
        return net.to(self.device)

    def _teacher_of(self, p: int, tcfg: Config, scfg: Config, plist: list[Phase]):
        """(network, diffusion, weights) of phase p's teacher: the original one, or phase p-1's student."""
        from ..diffusion import GaussianDiffusion

        if p == 0:
            path, cfg = self.run_dir.root / files.TEACHER, tcfg
        else:
            path, cfg = files.student_path(self.run_dir.root, len(plist[p - 1].student_grid)), scfg
        state, _ = files.load_weights_file(path)
        net = self._network(cfg, state, path).eval().requires_grad_(False)
        return net, GaussianDiffusion.from_config(cfg.diffusion), state

    def _parts(self, scfg: Config, phase: Phase, init: dict) -> TrainParts:
        from ..diffusion import GaussianDiffusion

        model = self._network(scfg, init, self.run_dir.root / files.TEACHER).train()
        prec = resolve_precision("fp32" if scfg.train.precision == "fp16" else scfg.train.precision, self.device)
        return TrainParts(cfg=scfg, model=model, train_model=model, diffusion=GaussianDiffusion.from_config(scfg.diffusion),
                          ema=EMA(model, phase.ema_decay), optimizer=make_optimizer(list(model.parameters()), scfg.train,
                                                                                    self.device),
                          t_sampler=make_t_sampler("uniform", scfg.diffusion.num_timesteps), precision=prec,
                          device=self.device)

    def _batches(self, cfg: Config):
        from ..data import open_dataset
        from ..training.batches import BatchSource

        ds = open_dataset(cfg.data.source, "train", cfg.model.resolution, cfg.model.in_channels,
                          cfg.data.skip_bad_images, self.log)
        labels = None
        if cfg.model.num_classes > 0:
            from ..conditioning import dataset_labels

            labels = dataset_labels(ds, cfg.model.num_classes, cfg.data.source)
        return BatchSource(ds, self.settings.batch_size, self.settings.seed, cfg.data.random_flip, labels=labels)

    # ------------------------------------------------------------------------------------ checkpoints
    def _save(self, parts: TrainParts, batches, phase: Phase, s: int, gstep: int) -> Path:
        tensors, meta = layout.pack(parts, layout.Counters(step=gstep), batches.state_dict(),
                                    [layout.rng_state(self.device)])
        meta["distill"] = {"phase": phase.index, "phase_step": s, "phase_steps": phase.steps,
                           "teacher_steps": len(phase.teacher_grid), "steps": len(phase.student_grid),
                           "kept": list(phase.student_grid), "settings": self.settings.to_dict()}
        path = self.run_dir.checkpoint_path(gstep)
        save_checkpoint(path, tensors, meta)
        self.run_dir.set_latest(path)
        self.run_dir.rotate(2)
        return path

    # ------------------------------------------------------------------------------------ loop
    def run(self, teacher: str | Path) -> dict:
        tcfg, scfg, plist = self._open(teacher)
        offsets = [sum(ph.steps for ph in plist[:i]) for i in range(len(plist) + 1)]
        batches = self._batches(tcfg)
        p, s, restore = 0, 0, None
        found = find_resume_checkpoint(self.run_dir, self.log)
        if found is not None:
            path, tensors, meta = found
            d = meta.get("distill") or {}
            p, s = int(d.get("phase", 0)), int(d.get("phase_step", 0))
            if p >= len(plist) or plist[p].student_grid != tuple(d.get("kept", ())):
                raise CheckpointError(f"{path}: phase {p} does not match this distillation's phases")
            restore = (path, tensors, meta)
        self._print_plan(tcfg, scfg, plist, min(p, len(plist) - 1), offsets[p] + s if p < len(plist) else offsets[-1])
        t0, done, stopped, last_student = time.perf_counter(), 0, 0, None
        self.bar = Progress(self.progress, offsets[p] + s, offsets[-1])
        try:
            while p < len(plist) and not stopped:
                phase = plist[p]
                # dropout's stream: seeded per phase (a resumed phase then restores the saved one)
                torch.manual_seed(stream_seed(self.settings.seed, p, DROPOUT_STREAM))
                teacher_net, teacher_diff, init = self._teacher_of(p, tcfg, scfg, plist)
                parts = self._parts(scfg, phase, init)
                if restore is not None:
                    layout.unpack(parts, restore[1], restore[2], restore[0])
                    batches.load_state_dict(restore[2]["data_sampler"])
                    self.log(f"resumed phase {p} ({phase.describe()}) at step {s} of {phase.steps} from "
                             f"{restore[0].name}")
                    restore = None
                    if s >= phase.steps:  # a finished phase: its student becomes the next teacher
                        last_student = files.student_path(self.run_dir.root, len(phase.student_grid))
                        p, s = p + 1, 0
                        continue
                else:
                    self.log(f"phase {p}: {phase.describe()} steps, {phase.steps} optimiser steps, lr {phase.lr:g} "
                             f"(linear decay to 0)")
                s, stopped, n = self._phase(parts, teacher_net, teacher_diff, phase, batches, s, offsets[p])
                done += n
                if s >= phase.steps:
                    last_student = files.student_path(self.run_dir.root, len(phase.student_grid))
                    p, s = p + 1, 0
        finally:
            self.bar.close()
            batches.close()
        secs = time.perf_counter() - t0
        if stopped:
            self.log(f"stopped ({signal.Signals(stopped).name}) at phase {p} step {s}; continue with "
                     f"ddpm distill --out {self.run_dir.root}")
        else:
            self.log(f"finished: {len(plist[-1].student_grid)}-step student {last_student} ({done} optimiser steps "
                     f"in {secs:.0f} s)")
        return {"steps": None if last_student is None else int(last_student.stem.split("_")[1]),
                "student": None if last_student is None else str(last_student),
                "global_step": offsets[p] + s if p < len(plist) else offsets[-1],
                "stopped_by": stopped or None, "seconds": secs, "optimizer_steps": done}

    def _print_plan(self, tcfg: Config, scfg: Config, plist: list[Phase], p: int, done: int) -> None:
        from .plan import measure_distill_step, plan_lines, warmup_enabled

        secs = None
        if warmup_enabled():
            teacher_net, teacher_diff, init = self._teacher_of(0, tcfg, scfg, plist)
            secs = measure_distill_step(teacher_net, teacher_diff, self._parts(scfg, plist[p], init), plist[p],
                                        self.device)
        for line in plan_lines(tcfg, self.teacher_source, plist, secs, done):
            self.log(line)

    def _phase(self, parts: TrainParts, teacher, teacher_diff, phase: Phase, batches, s: int, offset: int
               ) -> tuple[int, int, int]:
        """Run phase steps from ``s``; returns (phase step reached, stop signal or 0, steps taken)."""
        from ..images import to_model

        st = self.settings
        writer = (self.run_dir.metrics_path).open("a")
        n, window, saved = 0, [], s
        try:
            while s < phase.steps:
                x0 = to_model(batches.next(), self.device)
                kwargs = {} if batches.last_labels is None else {"y": batches.last_labels.to(self.device)}
                out = distill_step(parts, teacher, teacher_diff, phase, Batch(x0, kwargs), s, st.clip, st.snr_floor)
                s, n = s + 1, n + 1
                if out.applied:
                    window.append(out.loss)
                self.bar.update()
                if s % st.log_every == 0 and window:
                    rec = {"phase": phase.index, "steps": len(phase.student_grid), "phase_step": s,
                           "step": offset + s, "loss": sum(window) / len(window), "lr": out.lr,
                           "grad_norm": out.grad_norm}
                    writer.write(json.dumps(rec) + "\n")
                    writer.flush()
                    self.bar.set_loss(rec["loss"], 0)
                    window = []
                sig = self.stop.signum or 0
                if s == phase.steps:
                    files.save_student(files.student_path(self.run_dir.root, len(phase.student_grid)),
                                       parts.ema.module, parts.cfg, phase.student_grid, phase.index, offset + s,
                                       self.teacher_source)
                if sig or s == phase.steps or s % st.save_every == 0:
                    if saved != s:
                        self._save(parts, batches, phase, s, offset + s)
                        saved = s
                if sig:
                    return s, sig, n
            if s == phase.steps:
                self.log(f"phase {phase.index} done: {len(phase.student_grid)}-step student -> "
                         f"{files.student_path(self.run_dir.root, len(phase.student_grid))}")
            return s, 0, n
        finally:
            writer.close()
