"""Dataset readers behind :mod:`ddpm.data` (import from there).

``base`` (the item contract), ``digits``, ``cifar``, ``folder``, ``arrays`` (.npy/.npz),
``imageops`` (Pillow decoding), ``sampler`` (epoch order and flips).
"""
