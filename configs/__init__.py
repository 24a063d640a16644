"""Preset runs, one file each; `--config NAME` picks one. Installed with the package as `fgpt_jax.configs`.

Each file defines `get_config() -> fgpt_jax.config.Config`. Copy one to start your own and pass its
path: `python -m fgpt_jax.train --config path/to/mine.py`.
"""
