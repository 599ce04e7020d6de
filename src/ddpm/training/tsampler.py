"""Which timesteps each training example gets.

``uniform`` is the paper's t ~ U{0..T-1}, one per example (paper section 3.3 and Appendix B). ``importance`` is
improved-diffusion's loss-second-moment resampler (Nichol & Dhariwal 2021): keep the last 10 losses seen at
every t; once every t has 10, sample t with probability p_t ∝ sqrt(E[L_t²]), mixed with a
uniform distribution of weight 0.001, and weight each example by 1/(T·p_t) so the weighted loss
is still an unbiased estimate of the uniform-t loss. Before that warm-up it samples uniformly
with weight 1.

Both draw from a ``torch.Generator`` passed in, so the trainer controls reproducibility, and
return (t int64 [B], weights float32 [B]) on the generator's device. ``on_device`` says whether a
sampler can draw on an accelerator: the uniform one can (the training step then never waits for
the host); the importance sampler keeps its loss history on the CPU, draws there and needs the
losses on the host after every step.
"""

from __future__ import annotations

import torch


class UniformSampler:
    """t ~ U{0..T-1}; all weights 1."""

    on_device = True

    def __init__(self, num_timesteps: int):
        self.num_timesteps = int(num_timesteps)

    def probabilities(self) -> torch.Tensor:
        """float64 [T]."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        dev = generator.device
        t = torch.randint(0, self.num_timesteps, (batch_size,), generator=generator, dtype=torch.int64, device=dev)
        return t, torch.ones(batch_size, dtype=torch.float32, device=dev)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Nothing to learn."""

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass


class LossSecondMomentSampler(UniformSampler):
    """Importance sampling of t by the root mean square of recent losses (improved-diffusion).

    Args:
        num_timesteps: T.
        history: losses remembered per t (10 in improved-diffusion).
        uniform_prob: weight of the uniform component of the mixture (0.001).
    """

    on_device = False

    def __init__(self, num_timesteps: int, history: int = 10, uniform_prob: float = 1e-3):
        super().__init__(num_timesteps)
        self.history = int(history)
        self.uniform_prob = float(uniform_prob)
        self.loss_history = torch.zeros(self.num_timesteps, self.history, dtype=torch.float64)
        self.loss_counts = torch.zeros(self.num_timesteps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.loss_counts == self.history).all())

    def probabilities(self) -> torch.Tensor:
        """p_t = (1-u)·sqrt(mean(L_t²))/Σ_s sqrt(mean(L_s²)) + u/T once warmed up, else uniform."""
        if not self.warmed_up():
            return super().probabilities()
        rms = self.loss_history.pow(2).mean(dim=1).sqrt()
        p = rms / rms.sum()
        return p * (1.0 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.warmed_up():
            return super().sample(batch_size, generator)
        p = self.probabilities()
        t = torch.multinomial(p, batch_size, replacement=True, generator=generator)
        w = 1.0 / (self.num_timesteps * p[t])
        return t, w.to(torch.float32)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-example losses (unweighted, [B]) at their timesteps ([B]), in batch order.

        Once a timestep has ``history`` losses, the oldest is dropped for the new one.
        """
        for ti, li in zip(t.tolist(), losses.detach().double().cpu().tolist()):
            n = int(self.loss_counts[ti])
            if n == self.history:
                self.loss_history[ti, :-1] = self.loss_history[ti, 1:].clone()
                self.loss_history[ti, -1] = li
            else:
                self.loss_history[ti, n] = li
                self.loss_counts[ti] = n + 1

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        h, c = tensors["loss_history"], tensors["loss_counts"]
        if tuple(h.shape) != tuple(self.loss_history.shape) or tuple(c.shape) != tuple(self.loss_counts.shape):
            raise ValueError("importance sampler state has the wrong shape for this num_timesteps")
        self.loss_history = h.to(torch.float64).clone()
        self.loss_counts = c.to(torch.int64).clone()


def make_t_sampler(kind: str, num_timesteps: int) -> UniformSampler:
    """``"uniform"`` or ``"importance"`` (``train.t_sampler``)."""
    if kind == "uniform":
        return UniformSampler(num_timesteps)
    if kind == "importance":
        return LossSecondMomentSampler(num_timesteps)
    raise ValueError(f"unknown t sampler {kind!r}")
