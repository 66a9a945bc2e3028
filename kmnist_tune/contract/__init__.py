"""The sweep contract: what a sweep is, independent of how it is trained or stored.

spec (YAML -> typed settings, W&B vocabulary), space (spec -> Optuna suggestions) and records (the
typed trial, study and epoch records every other layer reads and writes). Imports neither torch nor
fastai; only `space` imports Optuna, so the training layer can use the rest without it.
"""
