"""Class-conditional training: labels and label dropout reach the network; resume stays bit-exact
(the resume test of test_resume.py, on a conditional run); two gloo processes equal one."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from ddpm.checkpoint import load_checkpoint
from ddpm.errors import DataError

from test_resume import _straight_vs_split, assert_identical_state, run, tiny_config, with_steps

pytestmark = pytest.mark.usefixtures("one_thread")


def cond_config(p_uncond: float = 0.5, **train):
    cfg = tiny_config(dropout=0.1, **train)
    return replace(cfg, model=replace(cfg.model, num_classes=10), train=replace(cfg.train, p_uncond=p_uncond))


def test_resume_is_bit_identical_with_label_dropout(tmp_path):
    a, b, msgs = _straight_vs_split(cond_config(), 6, tmp_path)
    assert any("resumed from" in m for m in msgs)
    assert_identical_state(a, b)
    meta = load_checkpoint(a)[1]
    assert meta["config"]["data"]["class_names"] == [str(k) for k in range(10)]
    assert meta["config"]["model"]["num_classes"] == 10


def test_label_dropout_changes_training_and_the_null_row_learns_only_from_dropped_labels(tmp_path):
    """Adam leaves a row of the class table exactly where it started when its gradient is 0 at
    every step: with p_uncond = 1 only the null row (10) moves, with p_uncond = 0 only real rows."""
    msgs: list[str] = []
    rows = {}
    for p in (0.0, 1.0, 0.5):
        out = run(with_steps(cond_config(p_uncond=p), 2), tmp_path / f"p{p}", log=msgs)
        t = load_checkpoint(out["checkpoint"])[0]
        rows[p] = t["model/class_emb.weight"]
    from ddpm.training.step import INIT_STREAM, stream_seed
    from ddpm.nets.unet import UNet

    cfg = cond_config()
    torch.manual_seed(stream_seed(cfg.train.seed, 0, INIT_STREAM))
    start = UNet.from_config(cfg.model, cfg.out_channels).class_emb.weight.detach()
    moved = {p: [not torch.equal(r[k], start[k]) for k in range(11)] for p, r in rows.items()}
    assert moved[1.0] == [False] * 10 + [True]
    assert moved[0.0][10] is False and sum(moved[0.0][:10]) >= 8  # 16 digits over 2 steps: most classes seen
    assert moved[0.5][10] is True and not torch.equal(rows[0.5], rows[0.0])
    assert any("classes: 10 (0=0, 1=1" in m for m in msgs)


def test_unlabelled_data_with_a_conditional_config_is_one_line_naming_the_file(tmp_path):
    x = np.zeros((16, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", x)
    cfg = cond_config()
    cfg = replace(cfg, data=replace(cfg.data, source=str(tmp_path / "plain.npz")))
    with pytest.raises(DataError, match=r"plain.npz' has no class labels") as e:
        run(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
    np.savez(tmp_path / "labelled.npz", x, np.arange(16) % 12)  # labels 10, 11 on a 10-class model
    cfg = replace(cfg, data=replace(cfg.data, source=str(tmp_path / "labelled.npz")))
    with pytest.raises(DataError, match=r"labelled.npz'.*label 11 is outside 0\.\.9"):
        run(cfg, tmp_path / "run2")
    assert not (tmp_path / "run2" / "checkpoints").exists() or not any((tmp_path / "run2" / "checkpoints").iterdir())


@pytest.mark.distributed
@pytest.mark.slow
def test_two_process_gloo_matches_one_process_with_label_dropout(tmp_path):
    from safetensors.torch import load_file

    from test_distributed import CFG, _torchrun
    from ddpm.training import train

    cfg = replace(CFG, model=replace(CFG.model, num_classes=10), train=replace(CFG.train, p_uncond=0.5))
    out, stdout = _torchrun(tmp_path, replace(cfg, train=replace(cfg.train, grad_accum=2)), 2)
    assert "RESULT 0 2 4" in stdout and "RESULT 1 2 4" in stdout
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(cfg, tmp_path / "single", device="cpu", progress=False, log=lambda m: None)
    finally:
        torch.set_num_threads(n)
    s = load_checkpoint(single["checkpoint"])[0]
    # the tolerance of test_distributed.py (summation order across ranks, a few Adam steps)
    for k in r0:
        torch.testing.assert_close(r0[k], s[k], rtol=0, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # not vacuous: the class rows moved far more than the tolerance
    from ddpm.nets.unet import UNet
    from ddpm.training.step import INIT_STREAM, stream_seed

    torch.manual_seed(stream_seed(cfg.train.seed, 0, INIT_STREAM))
    init = UNet.from_config(cfg.model, cfg.out_channels).class_emb.weight.detach()
    assert (s["model/class_emb.weight"] - init).abs().max() > 1e-4


def test_training_sample_grids_have_one_row_per_class(tmp_path):
    from PIL import Image

    cfg = cond_config()
    cfg = replace(cfg, train=replace(cfg.train, total_steps=2, sample_every=2, sample_n=20))
    run(cfg, tmp_path / "r")
    (png,) = (tmp_path / "r" / "samples").glob("*.png")
    grid = np.asarray(Image.open(png))
    # 10 class rows x 2 images, 8x8 cells x8; at step 2 the EMA still holds most of its initial weights,
    # so the raw weights' grid (same layout) stands beside it after a 4-pixel band (ddpm.training.grids)
    assert grid.shape[:2] == ((10 * 9 + 1) * 8, ((2 * 9 + 1) * 2 + 4) * 8)


def test_folder_classes_are_kept_in_the_run_config(tmp_path):
    import json

    from PIL import Image

    rng = np.random.default_rng(0)
    for k, name in enumerate(("zebra", "ant")):
        for i in range(4):
            (tmp_path / "imgs" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / name / f"{i}.png")
    cfg = cond_config()
    cfg = replace(cfg, model=replace(cfg.model, num_classes=2), data=replace(cfg.data, source=str(tmp_path / "imgs")),
                  train=replace(cfg.train, total_steps=1))
    msgs: list[str] = []
    out = run(cfg, tmp_path / "r", log=msgs)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["data"]["class_names"] == ["ant", "zebra"]
    assert load_checkpoint(out["checkpoint"])[1]["config"]["data"]["class_names"] == ["ant", "zebra"]
    assert any("classes: 2 (0=ant, 1=zebra)" in m for m in msgs)
