"""portanet: fully connected networks with hand-written, vectorized backprop on any array-API backend."""

from . import activations, callbacks, data, datasets, io, layers, losses, metrics, optimizers
from .backends import Device, resolve_device, to_numpy
from .callbacks import (Callback, EarlyStopping, History, LearningRateScheduler, ModelCheckpoint, ReduceLROnPlateau,
                        TerminateOnNaN)
from .gradcheck import check_gradients
from .io import ModelFileError, load
from .layers import Activation, Dense, Dropout
from .losses import (BinaryCrossentropy, CategoricalCrossentropy, Huber, MeanAbsoluteError, MeanSquaredError,
                     SparseCategoricalCrossentropy)
from .model import Model
from .optimizers import SGD, Adam, AdamW, RMSprop

__version__ = "0.1.0"

__all__ = [
    "Model", "Dense", "Dropout", "Activation",
    "SGD", "Adam", "AdamW", "RMSprop",
    "MeanSquaredError", "MeanAbsoluteError", "Huber", "BinaryCrossentropy", "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy",
    "Callback", "History", "EarlyStopping", "ModelCheckpoint", "LearningRateScheduler", "ReduceLROnPlateau",
    "TerminateOnNaN", "load", "ModelFileError",
    "Device", "resolve_device", "to_numpy", "check_gradients",
    "activations", "callbacks", "data", "datasets", "io", "layers", "losses", "metrics", "optimizers",
]
