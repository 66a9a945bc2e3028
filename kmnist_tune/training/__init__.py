"""Training: data files and splits, the device-resident loader, augmentation, models, precision and
one fastai run. Imports torch and fastai, never Optuna: a trial is the recipe layer's business.
"""
