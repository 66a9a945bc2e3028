"""kmnist-tune: Optuna sweeps of fastai ResNets on the Kuzushiji data sets."""

__version__ = "0.1.0"
