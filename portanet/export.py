"""Export a built model to one ONNX file that ONNX Runtime (server, phone, browser) runs without portanet.

A feature on top of the core: it reads only the model's public API (``layers``, ``parameters()``,
``parameter_buffer.states()``, ``dtype``, ``get_config()``) and never imports a backend; ``onnx`` is imported inside
:func:`export_onnx`, so ``import portanet`` does not need it (``pip install "portanet[onnx]"`` adds it).

**How the graph is built, and why.** The graph is written node by node with ``onnx.helper``; it is not traced by
running the model's own forward through an ONNX-backed array namespace (ndonnx). Tracing would add a dependency
(ndonnx and its graph library) to save about three lines per activation, and it could not give the guarantees that
matter here: (1) the operators must be chosen, not inherited. ONNX Runtime's CPU provider has no float64 kernels
for Elu and Softplus (nor, before recent releases, LeakyRelu and Gelu), and its Sigmoid loses the negative tail
(float32: 17% relative error at -15, 0 from -18 on; float64: 1e-3 at -30), while a namespace would emit whatever
operators its ``exp``/``expm1``/``log1p`` map to. (2) Layers bind to their namespace when the model builds;
rebinding them to a foreign one, and replaying in-place updates (``z += bias``) and backend fast paths
symbolically, would go through private model internals that are being restructured. An MLP is a chain of Gemm and
elementwise nodes, so writing each activation's forward formula out as ONNX operators, operation for operation, is
short, keeps the same rounding as ``predict``, and is tested against it on every backend.

**What maps to what** (the same graph for float32 and float64; every operator has float and double CPU kernels in
ONNX Runtime at every opset from :data:`MIN_OPSET` to :data:`MAX_OPSET`)::

    Dense          Gemm(x, kernel[, bias]); kernel (in, units) as an initializer named like the parameter
    Dropout        nothing (identity at inference)
    Activation     its activation, below
    LayerNorm.     d = x - ReduceMean(x, axis 1); xhat = d * (1 / Sqrt(ReduceMean(d * d, axis 1) + epsilon));
                   xhat * gamma + beta   (portanet's operations in its order)
    BatchNorm.     xhat = (x - moving_mean) * (1 / Sqrt(moving_variance + epsilon)); xhat * gamma + beta
                   (inference: the moving statistics, initializers named like the state entries)
    linear         nothing
    relu           Relu
    leaky_relu     Where(z > 0, z, alpha * z)
    elu            Where(z > 0, z, alpha * expm1(Min(z, 0)))
    gelu           0.5 z (1 + Tanh(sqrt(2/pi) (z + 0.044715 z^3)))   (the tanh form portanet trains with)
    sigmoid        e = Exp(-|z|); Where(z >= 0, 1 / (1 + e), e / (1 + e))   (no overflow, full relative precision)
    tanh           Tanh
    softplus       Max(z, 0) + log1p(Exp(-|z|))
    softmax        Softmax(axis=-1)   (ONNX Runtime subtracts the row maximum)

ONNX has no ``expm1`` or ``log1p``; they are computed to a few ulps with Kahan's corrections (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed., section 1.14.1; Goldberg, *What every computer scientist should know
about floating-point arithmetic*, 1991, theorem 4): ``log1p(x) = x`` if ``1 + x == 1`` else
``log(1 + x) * x / ((1 + x) - 1)``, and ``expm1(x) = x`` if ``u == 1``, ``-1`` if ``u - 1 == -1``, ``u`` if ``u``
is infinite, else ``(u - 1) * x / log(u)``, with ``u = exp(x)``.

**Custom activations.** An activation object with a method ``to_onnx(self, graph, x)`` is exported through it
(before any built-in mapping): ``x`` is the name of its input value, and it returns the name of its output, built
with the :class:`OnnxGraph` it receives::

    class Swish(pn.activations.ActivationFunction):
        name = "swish"
        def forward(self, z, xp): ...
        def backward(self, grad, z, a, xp): ...
        def to_onnx(self, graph, x):
            return graph.op("Mul", x, graph.sigmoid(x))

Anything else that has no mapping (an activation without ``to_onnx``, a layer class other than Dense, Dropout,
Activation, LayerNormalization and BatchNormalization, subclasses included, since they may change the forward)
raises :class:`ExportError` naming the layer.

**Opsets.** :data:`DEFAULT_OPSET` (21) is what onnx 1.16 writes and ONNX Runtime 1.18 and later run, so a default
export serves on runtimes two years old; any opset from :data:`MIN_OPSET` (13: Softmax over one axis) to
:data:`MAX_OPSET` (28, the newest ONNX Runtime 1.32 implements) may be asked for, and each gives the same operators
and numbers. Writing opset N needs an ``onnx`` package that knows it (opset 21: onnx 1.16; 28: onnx 1.23); running
it needs a runtime that implements it (ONNX Runtime 1.18 runs 13 to 21 and refuses later ones).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
from pathlib import Path

import numpy as np

from . import activations as _activations
from . import layers as _layers
from ._files import write_atomic

__all__ = ["export_onnx", "OnnxGraph", "ExportError", "DEFAULT_OPSET", "MIN_OPSET", "MAX_OPSET"]

MIN_OPSET = 13
MAX_OPSET = 28
DEFAULT_OPSET = 21
INPUT_NAME = "input"
OUTPUT_NAME = "output"
_MAX_BYTES = 2**31 - 2**24  # protobuf's 2 GB message limit, less room for the graph itself
_INSTALL = 'pip install "portanet[onnx]"'


class ExportError(ValueError):
    """The model holds something export_onnx cannot express in ONNX; the message names the layer and the remedy."""


class OnnxGraph:
    """The graph under construction, as a ``to_onnx(self, graph, x)`` hook sees it. Values are named by strings.

    ``op(op_type, *inputs, **attributes) -> name``: one node of the standard ONNX domain (``""``), one output.
    ``constant(value) -> name``: a constant (scalar or array) in the model's dtype.
    ``sigmoid(x)``, ``softplus(x)``, ``expm1(x)``, ``log1p(x)``: the stable compositions portanet's own activations
    use (each returns a name). ``has(name)``: whether a name is a value of the graph. ``dtype`` ("float32" or
    "float64") and ``opset`` (int) say what is being written.
    For a float64 model use operators ONNX Runtime's CPU provider has double kernels for (not Elu, Softplus,
    HardSigmoid, ...): the compositions above are safe in both dtypes.
    """

    def __init__(self, onnx, dtype: str, opset: int):
        self._onnx = onnx
        self.dtype = dtype
        self.opset = opset
        self._nodes: list = []
        self._initializers: list = []
        self._values = {INPUT_NAME}
        self._constants: dict = {}
        self._scope = "graph"
        self._count = 0

    # -- the hook interface --------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, **attributes) -> str:
        """Add node ``op_type(*inputs)`` with ``attributes``; returns the name of its (single) output."""
        for name in inputs:
            if not self.has(name):
                raise ExportError(f"in {self._scope!r}: {op_type} input {name!r} is not a value of the graph "
                                  "(use names returned by graph.op / graph.constant, or the hook's x)")
        self._count += 1
        out = f"{self._scope}/{op_type}_{self._count}"
        self._nodes.append(self._onnx.helper.make_node(op_type, list(inputs), [out], name=out, **attributes))
        self._values.add(out)
        return out

    def constant(self, value) -> str:
        """A constant in the model's dtype (Python scalars are shared across the graph)."""
        array = np.asarray(value, dtype=self.dtype)
        key = float(value) if array.ndim == 0 else None
        if key is not None and key in self._constants:
            return self._constants[key]
        self._count += 1
        name = f"const/{key!r}" if key is not None else f"{self._scope}/const_{self._count}"
        self._add_initializer(name, array)
        if key is not None:
            self._constants[key] = name
        return name

    def has(self, name) -> bool:
        """Whether ``name`` is a value of the graph (the input, an initializer or a node's output)."""
        return isinstance(name, str) and name in self._values

    def sigmoid(self, x: str) -> str:
        """1 / (1 + exp(-x)) without overflow and with full relative precision in both tails."""
        e = self.op("Exp", self.op("Neg", self.op("Abs", x)))
        denominator = self.op("Add", self.constant(1.0), e)
        return self.op("Where", self.op("GreaterOrEqual", x, self.constant(0.0)),
                       self.op("Div", self.constant(1.0), denominator), self.op("Div", e, denominator))

    def softplus(self, x: str) -> str:
        """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)): no overflow, full relative precision for x << 0."""
        tail = self.log1p(self.op("Exp", self.op("Neg", self.op("Abs", x))))
        return self.op("Add", self.op("Max", x, self.constant(0.0)), tail)

    def log1p(self, x: str) -> str:
        """log(1 + x) for x > -1, to a few ulps also where 1 + x rounds (Goldberg's theorem 4)."""
        u = self.op("Add", self.constant(1.0), x)
        d = self.op("Sub", u, self.constant(1.0))
        corrected = self.op("Div", self.op("Mul", self.op("Log", u), x), d)
        return self.op("Where", self.op("Equal", d, self.constant(0.0)), x, corrected)

    def expm1(self, x: str) -> str:
        """exp(x) - 1 to a few ulps also for |x| << 1 (Kahan, in Higham section 1.14.1); -1 and inf at the ends."""
        u = self.op("Exp", x)
        d = self.op("Sub", u, self.constant(1.0))
        corrected = self.op("Div", self.op("Mul", d, x), self.op("Log", u))
        saturated = self.op("Where", self.op("Equal", d, self.constant(-1.0)), self.constant(-1.0), corrected)
        finite = self.op("Where", self.op("IsInf", u), u, saturated)
        return self.op("Where", self.op("Equal", u, self.constant(1.0)), x, finite)

    # -- used by export_onnx ---------------------------------------------------------------------------------------
    def _reduce_mean(self, x: str, axis: int) -> str:
        """Mean of ``x`` over ``axis``, the axis kept (ReduceMean; its axes became an input in opset 18)."""
        if self.opset < 18:
            return self.op("ReduceMean", x, axes=[axis], keepdims=1)
        name = f"const/axes[{axis}]"
        if not self.has(name):
            self._initializers.append(self._onnx.numpy_helper.from_array(np.asarray([axis], dtype=np.int64), name))
            self._values.add(name)
        return self.op("ReduceMean", x, name, keepdims=1)

    @contextlib.contextmanager
    def _scoped(self, name: str):
        outer, self._scope = self._scope, name
        try:
            yield
        finally:
            self._scope = outer

    def _add_initializer(self, name: str, array) -> str:
        host = np.ascontiguousarray(np.asarray(array, dtype=self.dtype))
        self._initializers.append(self._onnx.numpy_helper.from_array(host, name))
        self._values.add(name)
        return name

    def _model(self, result: str, input_dim: int, output_dim: int, metadata: dict, doc: str):
        helper, tensor_type = self._onnx.helper, self._onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.dtype))
        producers = [node for node in self._nodes if result in node.output]
        if producers and result != INPUT_NAME:  # rename the last value instead of adding an Identity node
            for node in self._nodes:
                node.input[:] = [OUTPUT_NAME if name == result else name for name in node.input]
            producers[-1].output[:] = [OUTPUT_NAME]
        else:  # the input itself (only Dropout / linear layers) or a constant
            self._nodes.append(helper.make_node("Identity", [result], [OUTPUT_NAME], name="graph/output"))
        graph = helper.make_graph(
            self._nodes, "portanet", [helper.make_tensor_value_info(INPUT_NAME, tensor_type, ["batch", input_dim])],
            [helper.make_tensor_value_info(OUTPUT_NAME, tensor_type, ["batch", output_dim])],
            initializer=self._initializers)
        opsets = [helper.make_opsetid("", self.opset)]
        model = helper.make_model(graph, opset_imports=opsets, producer_name="portanet",
                                  producer_version=metadata["portanet_version"], doc_string=doc,
                                  ir_version=helper.find_min_ir_version_for(opsets))
        helper.set_model_props(model, metadata)
        return model


# -- activations ----------------------------------------------------------------------------------------------------
def _leaky_relu(graph, act, z):
    return graph.op("Where", graph.op("Greater", z, graph.constant(0.0)), z,
                    graph.op("Mul", graph.constant(act.alpha), z))


def _elu(graph, act, z):
    negative = graph.expm1(graph.op("Min", z, graph.constant(0.0)))
    return graph.op("Where", graph.op("Greater", z, graph.constant(0.0)), z,
                    graph.op("Mul", graph.constant(act.alpha), negative))


def _gelu(graph, act, z):
    # Operation for operation as GELU.forward: 0.5 * z * (1 + tanh(c * (z + 0.044715 * z * z * z))).
    cube = graph.op("Mul", graph.op("Mul", graph.op("Mul", graph.constant(0.044715), z), z), z)
    inner = graph.op("Mul", graph.constant(math.sqrt(2.0 / math.pi)), graph.op("Add", z, cube))
    gate = graph.op("Add", graph.constant(1.0), graph.op("Tanh", inner))
    return graph.op("Mul", graph.op("Mul", graph.constant(0.5), z), gate)


_ACTIVATION_BUILDERS = {
    _activations.Linear: lambda graph, act, z: z,
    _activations.ReLU: lambda graph, act, z: graph.op("Relu", z),
    _activations.LeakyReLU: _leaky_relu,
    _activations.ELU: _elu,
    _activations.GELU: _gelu,
    _activations.Sigmoid: lambda graph, act, z: graph.sigmoid(z),
    _activations.Tanh: lambda graph, act, z: graph.op("Tanh", z),
    _activations.Softplus: lambda graph, act, z: graph.softplus(z),
    _activations.Softmax: lambda graph, act, z: graph.op("Softmax", z, axis=-1),
}


def _activation(graph, layer, act, z):
    kind = type(act).__name__
    hook = getattr(act, "to_onnx", None)
    if callable(hook):
        out = hook(graph, z)
        if not graph.has(out):
            raise ExportError(f"layer {layer.name!r}: {kind}.to_onnx(graph, x) must return the name of its output "
                              f"value (a string from graph.op(...)), got {out!r}")
        return out
    builder = _ACTIVATION_BUILDERS.get(type(act))
    if builder is None:
        raise ExportError(
            f"layer {layer.name!r} ({type(layer).__name__}) uses the activation {kind} (name {act.name!r}), which "
            f"has no ONNX mapping: give {kind} a method to_onnx(self, graph, x) that builds its forward from ONNX "
            "operators and returns the output's name (see portanet.export.OnnxGraph)")
    return builder(graph, act, z)


# -- layers: one builder per class, (graph, layer, x, param) -> output name; param(key) is a host array ------------
def _dense(graph, layer, x, param):
    inputs = [x, graph._add_initializer(f"{layer.name}.kernel", param("kernel"))]
    if layer.use_bias:
        inputs.append(graph._add_initializer(f"{layer.name}.bias", param("bias")))
    return _activation(graph, layer, layer.activation, graph.op("Gemm", *inputs))


def _standardize(graph, layer, d, var):
    """d * (1 / sqrt(var + epsilon)), as ``_Normalization._standardize``."""
    inv = graph.op("Div", graph.constant(1.0), graph.op("Sqrt", graph.op("Add", var, graph.constant(layer.epsilon))))
    return graph.op("Mul", d, inv)


def _affine(graph, layer, xhat, param):
    """xhat * gamma + beta, each part only when the layer learns it."""
    if layer.scale:
        xhat = graph.op("Mul", xhat, graph._add_initializer(f"{layer.name}.gamma", param("gamma")))
    if layer.center:
        xhat = graph.op("Add", xhat, graph._add_initializer(f"{layer.name}.beta", param("beta")))
    return xhat


def _layer_normalization(graph, layer, x, param):
    d = graph.op("Sub", x, graph._reduce_mean(x, 1))
    var = graph._reduce_mean(graph.op("Mul", d, d), 1)
    return _affine(graph, layer, _standardize(graph, layer, d, var), param)


def _batch_normalization(graph, layer, x, param):
    mean = graph._add_initializer(f"{layer.name}.moving_mean", param("moving_mean"))
    var = graph._add_initializer(f"{layer.name}.moving_variance", param("moving_variance"))
    return _affine(graph, layer, _standardize(graph, layer, graph.op("Sub", x, mean), var), param)


_LAYER_BUILDERS = {
    _layers.Dense: _dense,
    _layers.Dropout: lambda graph, layer, x, param: x,
    _layers.Activation: lambda graph, layer, x, param: _activation(graph, layer, layer.activation, x),
    _layers.LayerNormalization: _layer_normalization,
    _layers.BatchNormalization: _batch_normalization,
}


# -- the entry point ------------------------------------------------------------------------------------------------
def _config(model) -> dict:
    """``model.get_config()``; without the optimizer when that cannot record itself (a plain callable learning
    rate has no config): serving needs none, and a model trained that way must still export."""
    try:
        return model.get_config()
    except ValueError:
        return model.get_config(include_optimizer=False)  # raises again if something else has no config


def _import_onnx():
    try:
        import onnx
        import onnx.checker
        import onnx.helper
        import onnx.numpy_helper
        import onnx.shape_inference
    except ImportError as error:
        raise ImportError(f"export_onnx needs the onnx package, which is not installed: {_INSTALL} "
                          f"({error})") from error
    return onnx


def _check_opset(opset, onnx) -> int:
    if opset is None:
        opset = DEFAULT_OPSET
    elif isinstance(opset, bool) or not isinstance(opset, numbers.Integral) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be an integer from {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET}), "
                         f"got {opset!r}")
    known = onnx.defs.onnx_opset_version()
    if opset > known:
        raise ImportError(f"opset {opset} needs a newer onnx package: onnx {onnx.__version__} knows opsets up to "
                          f"{known} (pip install -U onnx, or pass opset={known})")
    return int(opset)


def export_onnx(model, path, opset=None) -> str:
    """Write ``model`` (built, any backend or device) to the ONNX file ``path``; returns the path as a string.

    The graph takes ``"input"`` of shape (batch, input_dim) in the model's dtype (float32 or float64; the batch
    size is free) and returns ``"output"`` (batch, output_dim), the values ``model.predict`` gives (dropout off,
    BatchNormalization with its moving statistics). The file's
    metadata_props hold ``portanet_version`` and ``portanet_config`` (``model.get_config()`` as JSON); its
    producer is "portanet" (the config's ``"optimizer"`` is None when the optimizer's learning rate is a plain
    callable, which has no config). ``opset``: from :data:`MIN_OPSET` to :data:`MAX_OPSET`, default
    :data:`DEFAULT_OPSET`.
    The graph passes ``onnx.checker.check_model(full_check=True)`` before it is written, atomically (a temporary
    file in the same folder, then a rename): a failed export leaves an existing file untouched.

    Raises ImportError without onnx (``pip install "portanet[onnx]"``), RuntimeError for an unbuilt model,
    ValueError for an opset out of range, :class:`ExportError` (a ValueError) for a layer or activation without an
    ONNX mapping (naming the layer; see the module docs for the ``to_onnx`` hook) or parameters over 2 GB.
    """
    import portanet  # the package's public API, resolved at call time (to_numpy, Model, __version__)

    onnx = _import_onnx()
    opset = _check_opset(opset, onnx)
    if not isinstance(model, portanet.Model):
        raise TypeError(f"model must be a portanet.Model, got {type(model).__name__}")
    if not model.built:
        raise RuntimeError("export_onnx needs a built model: call fit() or build(input_dim) first")
    path = Path(os.fspath(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist")

    params = {**model.parameters(), **model.parameter_buffer.states()}  # BatchNormalization's moving statistics too
    size = sum(math.prod(p.shape) for p in params.values()) * np.dtype(model.dtype).itemsize
    if size > _MAX_BYTES:
        raise ExportError(f"the model's parameters take {size / 2**30:.2f} GB; one ONNX file holds at most 2 GB "
                          "(protobuf's limit) and export_onnx does not write external data")

    graph = OnnxGraph(onnx, model.dtype, opset)
    x = INPUT_NAME
    for layer in model.layers:
        builder = _LAYER_BUILDERS.get(type(layer))
        if builder is None:
            known = ", ".join(cls.__name__ for cls in _LAYER_BUILDERS)
            raise ExportError(f"layer {layer.name!r} is a {type(layer).__name__}, which has no ONNX mapping: "
                              f"export_onnx supports {known} (exactly these classes, not subclasses)")

        def param(key, prefix=f"{layer.name}."):
            return np.asarray(portanet.to_numpy(params[prefix + key]), dtype=model.dtype)

        with graph._scoped(layer.name):
            x = builder(graph, layer, x, param)

    metadata = {"portanet_version": portanet.__version__, "portanet_config": json.dumps(_config(model), default=str)}
    proto = graph._model(x, model.input_dim, model.output_dim, metadata,
                         doc=f"portanet model: {len(model.layers)} layers, {model.input_dim} -> {model.output_dim}, "
                             f"{model.dtype}")
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise ExportError(f"the exported graph fails ONNX's checker (a to_onnx hook building an invalid node?): "
                          f"{error}") from error
    write_atomic(path, proto.SerializeToString())
    return os.fspath(path)
