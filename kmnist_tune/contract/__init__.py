"""The sweep contract: what a sweep is, independent of how it is trained or stored.

spec (the typed settings), load (YAML or a stored mapping -> spec), wandb (W&B's sweep vocabulary,
both ways), quantiles (W&B's distributions by their quantile), space (spec -> Optuna suggestions),
records (the typed trial, study and epoch records every other layer reads and writes) and events.
Imports point one way: load -> wandb -> spec -> quantiles. Imports neither torch nor fastai; only
`space` imports Optuna, so the training layer can use the rest without it.
"""
