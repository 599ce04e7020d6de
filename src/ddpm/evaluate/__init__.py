"""Evaluation: bits/dim, rate–distortion, FID/IS/KID, offline digits quality, the paper's figures.

Submodules (import the one you need; nothing heavy is imported here):

- :mod:`ddpm.evaluate.nll`: ``evaluate_nll(model, diffusion, images_u8, ...) -> NLLResult``
  (all T VLB terms per image, sharded over ``torch.distributed`` ranks; paper section 4.2, Table 1).
- :mod:`ddpm.evaluate.rd`: ``rate_distortion(result)``, ``save_rd``, ``plot_rd``,
  ``format_table`` (paper section 4.3, Table 4, Fig. 5).
- :mod:`ddpm.evaluate.fid`: ``frechet_distance``, ``feature_statistics``, ``kid``,
  ``inception_score``, ``compute_fid`` (torch-fidelity's Inception, offline weights, cached
  reference statistics), ``generate_samples`` (seeds sharded over ranks).
- :mod:`ddpm.evaluate.digits_quality`: ``digits_quality(samples_u8)``, ``digits_reference()``
  (a small cached classifier stands in for Inception on the 8x8 digits).
- :mod:`ddpm.evaluate.figures`: ``save_progressive`` (Fig. 6), ``save_chains`` (Fig. 7),
  ``save_interpolation`` (Fig. 8/9), ``save_labelled_grid``.
- :mod:`ddpm.evaluate.shard`, :mod:`ddpm.evaluate.cache`: rank sharding and cache files.
"""
