"""The recipe: where a fastai run meets an Optuna trial. Batch halving, the LR-finder prior, the
objective, the test evaluation, and the session that works a study in this process.
"""
