"""Batch normalisation folded into the convolution before it, for inference.

At inference a batch-norm layer is a fixed per-channel scale and shift, so a linear
``Conv2D`` followed by one is the same map as one ``Conv2D`` with scaled kernels and a bias.
Keras runs the batch norm as separate element-wise passes over each activation tensor; on a
2-core CPU they cost about as much as the convolutions (``cellnet`` at 80 px, bf16, batch
256: 0.69 against 0.31 ms of core time per cell). Every prediction of the product (the
evaluation a gate judges, and scoring) runs the folded copy, so the figures a model is
promoted on come from the computation that scores.

The copy holds its own variables: :meth:`FoldedModel.refresh` recomputes them from the
model's current weights, so a model that trains on, or whose batch-norm statistics are
re-estimated, is never predicted with stale weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras


@dataclass(frozen=True)
class _Pair:
    conv: keras.layers.Conv2D  # the model's own layers
    norm: keras.layers.BatchNormalization
    folded: keras.layers.Conv2D  # the copy's convolution (with a bias)


def _foldable_pairs(model: keras.Model) -> dict[str, str]:
    """Batch-norm layer name -> the name of the convolution it folds into: the norm's only
    input is a linear ``Conv2D``'s output that nothing else reads, over the last axis."""
    pairs: dict[str, str] = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        if len(layer._inbound_nodes) != 1 or layer.axis not in (-1, len(layer.input.shape) - 1):
            continue
        parents = layer._inbound_nodes[0].parent_nodes
        if len(parents) != 1:
            continue
        conv = parents[0].operation
        if (type(conv) is keras.layers.Conv2D  # not a subclass with its own call
                and conv.data_format == "channels_last"
                and conv.get_config()["activation"] == "linear"
                and len(conv._inbound_nodes) == 1 and len(conv._outbound_nodes) == 1):
            pairs[layer.name] = conv.name
    return pairs


class _Folded(keras.layers.Layer):
    """Where a folded batch norm was: passes its input on (and takes the batch norm's call
    arguments, which the graph replays)."""

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None) -> Any:
        return inputs

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


class FoldedModel:
    """An inference copy of ``model`` with its foldable batch norms merged into their
    convolutions (``model`` itself is left as it is). Call :meth:`refresh` before
    predicting to take the model's current weights."""

    def __init__(self, model: keras.Model) -> None:
        self.source = model
        norm_to_conv = _foldable_pairs(model)
        conv_names = set(norm_to_conv.values())

        def clone_layer(layer: keras.layers.Layer) -> keras.layers.Layer:
            if layer.name in norm_to_conv:
                return _Folded(name=layer.name, dtype=layer.dtype_policy)
            config = layer.get_config()
            if layer.name in conv_names:
                config["use_bias"] = True
            return layer.__class__.from_config(config)

        # Nothing to fold (the article's models): the model itself, no copy to refresh.
        self.model = (keras.models.clone_model(model, clone_function=clone_layer)
                      if norm_to_conv else model)
        self.pairs = tuple(_Pair(model.get_layer(conv), model.get_layer(norm),
                                 self.model.get_layer(conv))
                           for norm, conv in norm_to_conv.items())
        folded = {p.conv.name for p in self.pairs} | {p.norm.name for p in self.pairs}
        # The other layers' variables, copied as they are.
        self.copies = [(source, target)
                       for layer in model.layers
                       if norm_to_conv and layer.weights and layer.name not in folded
                       for source, target in zip(layer.weights,
                                                 self.model.get_layer(layer.name).weights,
                                                 strict=True)]

    @property
    def folded_layers(self) -> int:
        return len(self.pairs)

    def refresh(self) -> None:
        """Recompute the copy's variables from the model's current weights (inside a
        ``tf.function`` too: a few hundred thousand numbers, negligible beside a batch)."""
        for source, target in self.copies:
            target.assign(source.value)
        for pair in self.pairs:
            kernel, bias = _folded_weights(pair.conv, pair.norm)
            pair.folded.kernel.assign(kernel)
            pair.folded.bias.assign(bias)

    def __call__(self, images: Any) -> Any:
        return self.model(images, training=False)


def _folded_weights(conv: keras.layers.Conv2D, norm: keras.layers.BatchNormalization
                    ) -> tuple[Any, Any]:
    """``norm(conv(x)) = conv'(x)`` with ``kernel' = kernel * s`` and
    ``bias' = (bias - mean) * s + beta``, ``s = gamma / sqrt(variance + epsilon)``, per output
    channel (the kernel's last axis), in float32."""
    ops = keras.ops
    scale = ops.rsqrt(ops.cast(norm.moving_variance, "float32") + norm.epsilon)
    if norm.scale:
        scale = scale * ops.cast(norm.gamma, "float32")
    bias = ops.cast(conv.bias, "float32") if conv.use_bias else ops.zeros_like(scale)
    bias = (bias - ops.cast(norm.moving_mean, "float32")) * scale
    if norm.center:
        bias = bias + ops.cast(norm.beta, "float32")
    return ops.cast(conv.kernel, "float32") * scale, bias
