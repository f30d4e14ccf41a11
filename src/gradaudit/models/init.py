"""Deterministic parameter initialisation from a generator, and shape helpers the builders share."""

from __future__ import annotations

import math

import torch
from torch import nn

from gradaudit.errors import ConfigError
from gradaudit.types import TaskInfo

_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _fan_in(weight: torch.Tensor) -> int:
    """Fan-in as ``torch.nn.init`` computes it: ``size(1)`` times the receptive field."""
    if weight.dim() < 2:
        raise ValueError("fan-in needs a weight with at least 2 dimensions")
    receptive = math.prod(weight.shape[2:]) if weight.dim() > 2 else 1
    return weight.shape[1] * receptive


@torch.no_grad()
def init_parameters_(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Initialise every parameter and buffer of `model` in place, drawing only from `generator`.

    Re-implements PyTorch's default initialisation with an explicit generator, so the global RNG
    is never read or advanced and one generator seed gives a bit-identical ``state_dict``:

    * ``Linear`` and ``Conv*``: weight ``kaiming_uniform_(a=sqrt(5))``, bias
      ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``;
    * ``BatchNorm*``, ``GroupNorm``, ``LayerNorm``: weight 1, bias 0 (BatchNorm running
      statistics reset to mean 0, variance 1, zero batches tracked);
    * ``Embedding``: weight ``N(0, 1)`` (the padding row, if any, zeroed).

    Modules are visited in ``model.modules()`` order, so the draws are reproducible.

    Args:
        model: the module to initialise (its tensors may be uninitialised, e.g. after
            ``to_empty``).
        generator: the only source of randomness; it must live on the parameters' device.

    Returns:
        `model` itself.

    Raises:
        TypeError: a parameter belongs to a module type this function does not know how to
            initialise (so nothing is ever left uninitialised silently).

    Example:
        >>> gen = torch.Generator().manual_seed(0)
        >>> layer = init_parameters_(nn.Linear(4, 2), gen)
        >>> bool(layer.weight.abs().max() <= 0.5)
        True
    """
    done: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            done.add(id(module.weight))
            if module.bias is not None:
                fan_in = _fan_in(module.weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(module.bias, -bound, bound, generator=generator)
                done.add(id(module.bias))
        elif isinstance(module, _NORMS):
            if isinstance(module, nn.modules.batchnorm._NormBase):
                module.reset_running_stats()
            for name in ("weight", "bias"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, nn.Parameter):
                    tensor.fill_(1.0 if name == "weight" else 0.0)
                    done.add(id(tensor))
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, generator=generator)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].fill_(0)
            done.add(id(module.weight))
    missed = [name for name, p in model.named_parameters() if id(p) not in done]
    if missed:
        raise TypeError(f"init_parameters_ does not know how to initialise: {', '.join(missed)}")
    return model


def image_shape(task: TaskInfo, model: str) -> tuple[int, int, int]:
    """The ``(C, H, W)`` input shape of an image task, or a ConfigError naming `model`."""
    shape = tuple(task.input_shape)
    if task.modality != "image" or len(shape) != 3:
        raise ConfigError(
            f"{model} needs image inputs of shape (C, H, W); dataset {task.dataset!r} gives "
            f"{task.modality} inputs of shape {shape}"
        )
    return shape  # type: ignore[return-value]


def flat_features(features: nn.Module, input_shape: tuple[int, ...]) -> int:
    """How many values `features` outputs per example, found by a dry run on one zero input.

    The dry run uses the device of `features` (the meta device when built by ``build_model``), so
    it costs nothing and draws no random numbers.
    """
    tensor = next(iter(features.parameters()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    was_training = features.training
    features.eval()
    try:
        with torch.no_grad():
            out = features(torch.zeros(1, *input_shape, device=device))
    finally:
        features.train(was_training)
    return int(math.prod(out.shape[1:]))
