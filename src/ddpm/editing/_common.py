"""What the editing methods share: argument checks, the batch walk and the network wrapper.

Every method follows :func:`ddpm.sample`'s contract: image k draws its noise only from its own
stream ``ImageNoise(seeds[k])``, so its result is the same at any batch size; conditioning
tensors in ``model_kwargs`` have one row per image; ``guidance`` is classifier-free guidance's W.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ..errors import SamplingOptionError
from ..sampling import _check_per_image, _check_seeds, _progress
from ..samplers.base import Chain, Denoiser
from ..speed import Speed, fast_network

__all__ = ["check_images", "check_kwargs", "Batches"]


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """float32 [N, C, H, W] (an image [C, H, W] becomes N = 1); values are the model's [-1, 1]."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.ndim not in (3, 4):
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SamplingOptionError(f"{what} must be a float tensor [N, C, H, W] in [-1, 1] (ddpm.images.to_model), "
                                  f"got {got}")
    x = images if images.ndim == 4 else images[None]
    if x.shape[0] < 1:
        raise SamplingOptionError(f"{what} is empty")
    return x.to(torch.float32)


def check_kwargs(model_kwargs: Mapping[str, torch.Tensor] | None, guidance: float | None, n: int) -> dict:
    kwargs = {k: _check_per_image(f"model_kwargs[{k!r}]", v, n) for k, v in (model_kwargs or {}).items()}
    if guidance is not None and not kwargs:
        raise SamplingOptionError("guidance needs conditioning: pass model_kwargs (e.g. {'y': labels})")
    return kwargs


class Batches:
    """The batch walk of an editing run over N images (one per seed).

    ``with Batches(...) as run: for sl, seeds in run: ...``; ``run.denoiser(chain, sl)`` is the
    network at the chain's steps with the slice's conditioning (:class:`Denoiser`), counting
    calls on the progress bar (``calls_per_batch`` calls per batch expected).
    """

    def __init__(self, model: Callable, seeds: Sequence[int], n: int, shape: Sequence[int], *, batch_size, device,
                 amp_dtype, speed: Speed | None, model_kwargs: Mapping[str, torch.Tensor] | None,
                 guidance: float | None, progress: bool, calls_per_batch: int, desc: str):
        self.seeds = _check_seeds(seeds)
        if len(self.seeds) != n:
            raise SamplingOptionError(f"seeds must have one integer per image ({n}), got {len(self.seeds)}")
        self.batch_size = n if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise SamplingOptionError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.shape, self.device = model, tuple(shape), torch.device(device)
        self.amp_dtype, self.speed, self.guidance = amp_dtype, speed, guidance
        self.kwargs = check_kwargs(model_kwargs, guidance, n)
        self.starts = range(0, n, self.batch_size)
        self.pbar = _progress(progress, len(self.starts) * calls_per_batch, desc)
        self._stack = contextlib.ExitStack()
        self.net = None

    def __enter__(self) -> "Batches":
        rows = min(self.batch_size, len(self.seeds)) * (2 if self.guidance is not None else 1)
        self.net = self._stack.enter_context(fast_network(self.model, self.device, self.shape, self.speed,
                                                          self.amp_dtype, batch=rows))
        if self.pbar is not None:
            self._stack.callback(self.pbar.close)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __iter__(self) -> Iterator[tuple[slice, list[int]]]:
        for i in self.starts:
            sl = slice(i, i + self.batch_size)
            yield sl, self.seeds[sl]

    def denoiser(self, chain: Chain, sl: slice, batch: int) -> Denoiser:
        kw = {k: v[sl].to(self.device) for k, v in self.kwargs.items()}
        on_call = None if self.pbar is None else (lambda: self.pbar.update(1))
        return Denoiser(self.net, chain, batch, self.amp_dtype, kw, self.guidance, on_call=on_call)
