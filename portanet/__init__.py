"""portanet: fully connected networks with hand-written, vectorized backprop on any array-API backend."""

from . import (activations, callbacks, checks, data, datasets, distributed, export, initializers, io, layers, losses, metrics,
               optimizers, regularizers, schedules)
from .backends import Device, resolve_device, to_numpy
from .checks import SetupWarning
from .callbacks import (Callback, EarlyStopping, History, LearningRateScheduler, ModelCheckpoint, ReduceLROnPlateau,
                        TerminateOnNaN)
from .distributed import DistributedError
from .export import export_onnx
from .gradcheck import check_gradients
from .io import ModelFileError
from .layers import Activation, BatchNormalization, Dense, Dropout, LayerNormalization
from .losses import (BinaryCrossentropy, CategoricalCrossentropy, Huber, MeanAbsoluteError, MeanSquaredError,
                     SparseCategoricalCrossentropy)
from .model import Model, load
from .optimizers import SGD, Adam, AdamW, RMSprop
from .schedules import (CosineDecay, CosineDecayRestarts, ExponentialDecay, InverseTimeDecay, LearningRateSchedule,
                        OneCycle, PiecewiseConstantDecay, PolynomialDecay)

__version__ = "0.1.0"

__all__ = [
    "Model", "Dense", "Dropout", "Activation", "LayerNormalization", "BatchNormalization",
    "SGD", "Adam", "AdamW", "RMSprop",
    "LearningRateSchedule", "ExponentialDecay", "PiecewiseConstantDecay", "PolynomialDecay", "InverseTimeDecay",
    "CosineDecay", "CosineDecayRestarts", "OneCycle",
    "MeanSquaredError", "MeanAbsoluteError", "Huber", "BinaryCrossentropy", "CategoricalCrossentropy",
    "SparseCategoricalCrossentropy",
    "Callback", "History", "EarlyStopping", "ModelCheckpoint", "LearningRateScheduler", "ReduceLROnPlateau",
    "TerminateOnNaN", "load", "ModelFileError", "export_onnx", "DistributedError", "SetupWarning",
    "Device", "resolve_device", "to_numpy", "check_gradients",
    "activations", "callbacks", "checks", "data", "datasets", "distributed", "export", "initializers", "io", "layers", "losses",
    "metrics", "optimizers", "regularizers", "schedules",
]
