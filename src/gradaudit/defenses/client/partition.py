"""Defenses that split the model: ``federated_dropout`` (sub-models) and ``private_head``.

Neither is a privacy mechanism with a proof; both change *what* leaves the client rather than
adding noise to it, and both need the loop engine (they hook into each client's training).

- ``federated_dropout`` (Caldas, Konečný, McMahan & Talwalkar, "Expanding the Reach of Federated
  Learning by Reducing Client Resource Requirements", arXiv:1812.07210, 2018): each client trains
  a random sub-model that keeps a fraction of every hidden layer's units, and sends the
  sub-model's update only.
- ``private_head`` (model partitioning, FedPer: Arivazhagan, Aggarwal, Singh & Choudhary,
  "Federated Learning with Personalization Layers", arXiv:1912.00818, 2019): some layers (by
  default the classifier head) stay on the client and are never sent.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from gradaudit.defenses import CLIENT_DEFENSES
from gradaudit.defenses.base import (
    HEURISTIC,
    ClientDefense,
    DefenseContext,
    LocalData,
    LocalTraining,
    with_tensors,
)
from gradaudit.models import classifier_head
from gradaudit.seeding import torch_generator
from gradaudit.types import ClientUpdate, TaskInfo, TensorDict

CHANNELWISE: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
)
"""Modules that act on each unit (channel) separately, so a dropped unit stays confined to its
own channel through them (and zero after them once zeroed)."""

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose output units (features, channels) federated dropout can drop."""


# --------------------------------------------------------------------------- federated dropout


@dataclass(frozen=True)
class UnitSlice:
    """The entries of one state tensor that belong to a layer's units.

    Attributes:
        key: the ``state_dict`` key.
        dim: the dimension indexed by unit.
        width: consecutive entries along `dim` per unit (a channel flattened into a linear
            layer's inputs spans ``H * W`` of them).
    """

    key: str
    dim: int
    width: int = 1


@dataclass(frozen=True)
class DroppableLayer:
    """A hidden layer whose units federated dropout drops, and where each unit lives.

    Attributes:
        name: the layer's module name.
        units: its output features (linear) or channels (convolution).
        exit: the module whose output is zeroed at the dropped units: the last module after the
            layer that acts on each unit separately (activation, BatchNorm, pooling).
        unit_dim: the unit dimension of that output (1 for channels, -1 for features).
        slices: the state entries of the units: the layer's rows, its BatchNorm's entries and
            the next layer's input columns.
    """

    name: str
    units: int
    exit: str
    unit_dim: int
    slices: tuple[UnitSlice, ...]


def _qualified(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _block(model: nn.Module, name: str) -> list[str]:
    """The layer `name` and the channel-wise modules that follow it in its nn.Sequential."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    if not isinstance(parent, nn.Sequential):
        return [name]
    names = [n for n, _ in parent.named_children()]
    block = [name]
    for sibling in names[names.index(child) + 1 :]:
        if not isinstance(parent.get_submodule(sibling), CHANNELWISE):
            break
        block.append(_qualified(parent_name, sibling))
    return block


def _unit_slices(model: nn.Module, block: list[str], consumer: str, units: int) -> list[UnitSlice]:
    """The entries of the block's units, or [] when the consumer's inputs do not map to them."""
    layer = model.get_submodule(block[0])
    slices = [UnitSlice(f"{block[0]}.weight", 0)]
    if layer.bias is not None:
        slices.append(UnitSlice(f"{block[0]}.bias", 0))
    for name in block[1:]:
        module = model.get_submodule(name)
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            slices += [UnitSlice(f"{name}.{key}", 0) for key, _ in module.named_parameters()]
            slices += [
                UnitSlice(f"{name}.{key}", 0)
                for key, value in module.named_buffers()
                if value.dim() == 1 and value.shape[0] == units
            ]
    target = model.get_submodule(consumer)
    if isinstance(target, nn.Linear) and target.in_features % units == 0:
        return [*slices, UnitSlice(f"{consumer}.weight", 1, target.in_features // units)]
    if isinstance(target, LAYERS) and target.groups == 1 and target.in_channels == units:
        return [*slices, UnitSlice(f"{consumer}.weight", 1)]
    return []


def _probe_input(task: TaskInfo, count: int = 2) -> Tensor:
    """Inputs that every model of the task accepts (categorical columns hold valid codes)."""
    x = torch.randn((count, *task.input_shape), generator=torch.Generator().manual_seed(0))
    if task.tabular is not None:
        x[:, len(task.tabular.numeric) :] = 0.0
    return x


def _perturbed_copy(model: nn.Module) -> nn.Module:
    """An evaluation-mode copy with every float parameter and buffer moved off its initial
    value (a zero BatchNorm shift would hide a non-zero output of a zeroed channel)."""
    probe = copy.deepcopy(model).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, tensor in [*probe.named_parameters(), *probe.named_buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn(tensor.shape, generator=generator))
                if name.endswith("running_var"):
                    tensor.abs_()
    return probe


def _is_exact(model: nn.Module, layer: DroppableLayer, consumer: str, task: TaskInfo) -> bool:
    """Whether zeroing the exit's dropped units zeroes exactly the consumer's mapped inputs.

    A layer inside a residual block feeds a sum, not the next layer alone; the probe catches
    that (the consumer then sees non-zero values at the dropped units' inputs).
    """
    probe = _perturbed_copy(model)
    keep = torch.arange(layer.units) % 2 == 0
    seen: list[Tensor] = []
    hooks = [
        probe.get_submodule(layer.exit).register_forward_hook(
            partial(_zero_dropped, keep=keep, dim=layer.unit_dim)
        ),
        probe.get_submodule(consumer).register_forward_pre_hook(
            lambda _m, inputs: seen.append(inputs[0].detach())
        ),
    ]
    try:
        with torch.no_grad():
            probe(_probe_input(task))
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        return False
    columns = layer.slices[-1]
    dropped = (~keep).repeat_interleave(columns.width)
    inputs = seen[0]
    along = inputs.shape[-1] if isinstance(probe.get_submodule(consumer), nn.Linear) else None
    if along is not None:
        return along == dropped.numel() and bool((inputs[..., dropped] == 0).all())
    return inputs.shape[1] == dropped.numel() and bool((inputs[:, dropped] == 0).all())


def droppable_layers(
    model: nn.Module, task: TaskInfo
) -> tuple[tuple[DroppableLayer, ...], tuple[str, ...]]:
    """The hidden layers whose units can be dropped exactly, and those that cannot.

    A hidden layer is every nn.Linear and nn.Conv{1,2,3}d but the classifier head. Its unit
    leaves through the channel-wise modules that follow it in its nn.Sequential and enters the
    next linear or convolutional layer; a layer qualifies when a probe confirms that zeroing
    those modules' output makes the next layer's corresponding inputs zero (not, say, a layer
    in a residual block, whose output joins a sum).

    Returns:
        The droppable layers in model order, and the names of the hidden layers kept whole.

    Example:
        >>> from gradaudit.types import TaskInfo
        >>> task = TaskInfo("toy", "tabular", (4,), 2, None, ("a", "b"))
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> layers, kept_whole = droppable_layers(net, task)
        >>> [(layer.name, layer.exit, layer.units) for layer in layers], kept_whole
        ([('0', '1', 8)], ())
    """
    head, _ = classifier_head(model)
    ordered = [n for n, m in model.named_modules() if isinstance(m, LAYERS)]
    found: list[DroppableLayer] = []
    whole: list[str] = []
    for i, name in enumerate(ordered):
        if name == head:
            continue
        module = model.get_submodule(name)
        units = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        block = _block(model, name)
        consumer = ordered[i + 1] if i + 1 < len(ordered) else None
        slices = _unit_slices(model, block, consumer, units) if consumer else []
        layer = DroppableLayer(
            name, units, block[-1], -1 if isinstance(module, nn.Linear) else 1, tuple(slices)
        )
        if slices and consumer is not None and _is_exact(model, layer, consumer, task):
            found.append(layer)
        else:
            whole.append(name)
    return tuple(found), tuple(whole)


def draw_sub_model(
    layers: tuple[DroppableLayer, ...], fraction: float, generator: torch.Generator
) -> dict[str, Tensor]:
    """Per layer, a boolean mask of the units kept: ``max(1, round(fraction * units))`` of them,
    chosen uniformly without replacement.

    Example:
        >>> layer = DroppableLayer("0", 4, "1", -1, ())
        >>> int(draw_sub_model((layer,), 0.5, torch.Generator().manual_seed(0))["0"].sum())
        2
    """
    masks: dict[str, Tensor] = {}
    for layer in layers:
        count = max(1, math.floor(fraction * layer.units + 0.5))
        keep = torch.zeros(layer.units, dtype=torch.bool)
        keep[torch.randperm(layer.units, generator=generator)[:count]] = True
        masks[layer.name] = keep
    return masks


def _zero_dropped(
    _module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor, *, keep: Tensor, dim: int
) -> Tensor:
    """Forward hook: the output with the dropped units zeroed (their gradient is then zero)."""
    shape = [1] * output.dim()
    shape[dim] = -1
    return output * keep.to(output.dtype).view(shape)


def _slice_mask(tensor: Tensor, piece: UnitSlice, keep: Tensor) -> Tensor:
    """Boolean mask of `tensor`'s entries that belong to kept units along the slice's dim."""
    shape = [1] * tensor.dim()
    shape[piece.dim] = -1
    return keep.repeat_interleave(piece.width).view(shape).expand_as(tensor)


def sub_model_masks(
    tensors: Mapping[str, Tensor], layers: tuple[DroppableLayer, ...], masks: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Per touched key, the boolean mask of entries that belong to the sub-model."""
    out: dict[str, Tensor] = {}
    for layer in layers:
        for piece in layer.slices:
            if piece.key not in tensors:
                continue
            inside = _slice_mask(tensors[piece.key], piece, masks[layer.name])
            out[piece.key] = out[piece.key] & inside if piece.key in out else inside
    return out


class FederatedDropoutParams(BaseModel):
    """Parameters of ``federated_dropout``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fraction: float = Field(
        0.75,
        gt=0,
        le=1,
        description="fraction of each hidden layer's units (features, channels) a client keeps",
    )


class FederatedDropout(ClientDefense):
    """Each client, each round, trains and sends a random sub-model (Caldas et al. 2018).

    Every hidden fully connected layer keeps `fraction` of its output units and every
    convolution `fraction` of its output channels; the classifier head's outputs and the input
    are never dropped. During the client's local steps forward hooks zero the dropped units'
    outputs, so they neither influence the forward pass nor receive a gradient; the update's
    entries of dropped units (their rows, BatchNorm entries and the next layer's columns) are
    zero and not sent, and `wire_bytes` counts the sub-model only. The masks come from a stream
    seeded by (seed, round, client): the server draws them, as in Caldas et al., so it knows
    them.

    Caldas, Konečný, McMahan & Talwalkar, "Expanding the Reach of Federated Learning by Reducing
    Client Resource Requirements", arXiv:1812.07210, 2018.
    """

    name: ClassVar[str] = "federated_dropout"
    guarantee = HEURISTIC

    def __init__(self, params: FederatedDropoutParams, context: DefenseContext) -> None:
        self.params = params
        self.seed = context.seed
        self.layers, self.kept_whole = droppable_layers(context.model, context.task)
        if not self.layers:
            raise ValueError(
                f"{type(context.model).__name__} has no hidden layer whose units can be dropped "
                "exactly (every hidden layer feeds a residual sum or a non-channel-wise layer)"
            )

    @property
    def needs_loop_engine(self) -> bool:
        """The sub-model's hooks run in the loop engine."""
        return True

    def masks(self, client: int, rnd: int) -> dict[str, Tensor]:
        """The units `client` keeps in round `rnd` (the same for training and sending)."""
        generator = torch_generator(self.seed, "federated_dropout", rnd, client)
        return draw_sub_model(self.layers, self.params.fraction, generator)

    def local_training(self, client: int, rnd: int) -> LocalTraining | None:
        """Train the round's sub-model: hooks zero the dropped units during the local steps."""
        masks = self.masks(client, rnd)
        return LocalTraining(context=partial(_sub_model, layers=self.layers, masks=masks))

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """Zero the dropped units' entries and count only the sub-model's bytes."""
        masks = self.masks(update.client_id, update.round)
        sent = set(update.sent_keys)
        inside = sub_model_masks(
            {k: v for k, v in update.tensors.items() if k in sent}, self.layers, masks
        )
        tensors = dict(update.tensors)
        for key, mask in inside.items():
            tensors[key] = torch.where(mask, tensors[key], torch.zeros_like(tensors[key]))
        size = sum(
            int(inside[k].sum()) * v.element_size() if k in inside else v.numel() * v.element_size()
            for k, v in tensors.items()
            if k in sent
        )
        return with_tensors(update, tensors, wire_bytes=size)

    def describe(self) -> dict[str, Any]:
        """Settings, what the sub-models hide and what they do not."""
        layers = ", ".join(layer.name for layer in self.layers)
        warnings = [
            "no formal privacy guarantee: federated dropout saves communication and client "
            "compute; the sub-model's update is still a gradient of the client's data, and the "
            "server knows which units it holds, so gradient inversion still applies to it",
        ]
        if self.kept_whole:
            warnings.append(
                f"layers {', '.join(self.kept_whole)} are trained whole: their units cannot be "
                "removed exactly (they feed a residual sum or a non-channel-wise layer)"
            )
        return self.entry(
            notes=[
                f"each client trains a random sub-model keeping {self.params.fraction:.0%} of "
                f"the units of each hidden layer ({layers}); the classifier head's outputs and "
                "the input are never dropped",
                "the server draws the sub-models (Caldas et al.), so it knows every client's "
                "mask; the dropped units' entries are zero and not sent, and the bytes sent "
                "count the sub-model only",
                "aggregation stays plain FedAvg: a unit's update is averaged with the zeros of "
                "the clients that dropped it; kept units are not rescaled, and the full model "
                "is evaluated",
            ],
            warnings=warnings,
        )


@contextmanager
def _sub_model(
    model: nn.Module, *, layers: tuple[DroppableLayer, ...], masks: Mapping[str, Tensor]
) -> Iterator[None]:
    """While active, `model` computes the sub-model: the dropped units' outputs are zero."""
    handles = [
        model.get_submodule(layer.exit).register_forward_hook(
            partial(_zero_dropped, keep=masks[layer.name], dim=layer.unit_dim)
        )
        for layer in layers
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@CLIENT_DEFENSES.register(
    "federated_dropout",
    summary="each client trains and sends a random sub-model keeping a fraction of every hidden "
    "layer's units (Caldas et al. 2018); heuristic, saves bytes",
    params=FederatedDropoutParams,
)
def build_federated_dropout(
    params: FederatedDropoutParams, context: DefenseContext
) -> FederatedDropout:
    """Find the droppable layers of the run's model.

    Raises:
        ValueError: the model has no hidden layer whose units can be dropped exactly.
    """
    return FederatedDropout(params, context)


# --------------------------------------------------------------------------- private head


def private_keys(state: Mapping[str, Tensor], prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """The state keys under any of `prefixes` (a module name or a full key).

    Raises:
        ValueError: a prefix matches no key.

    Example:
        >>> state = {"body.0.weight": 0, "head.weight": 0, "head.bias": 0, "header.x": 0}
        >>> private_keys(state, ("head",))
        ('head.weight', 'head.bias')
    """
    chosen: list[str] = []
    for prefix in prefixes:
        matched = [k for k in state if k == prefix or k.startswith(f"{prefix}.")]
        if not matched:
            raise ValueError(f"layers: {prefix!r} matches no key of the model's state_dict")
        chosen += [k for k in matched if k not in chosen]
    return tuple(k for k in state if k in chosen)


class PrivateHeadParams(BaseModel):
    """Parameters of ``private_head``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layers: tuple[str, ...] | None = Field(
        None,
        min_length=1,
        description="state_dict key prefixes of the layers kept on the client (default: the "
        "classifier head)",
    )


class PrivateHead(ClientDefense):
    """Some layers train on each client and never leave it (FedPer, Arivazhagan et al. 2019).

    Each client keeps its own copy of the private layers across rounds, starting from the
    initial global model: the copy is loaded when its training starts and saved when it ends
    (FedSGD: the client applies its private layers' gradient itself, with the federation's
    learning rate). The update carries zeros there and lists the keys as `withheld`, so
    aggregation leaves the global copy unchanged and attacks never read them. The round loop
    evaluates every personalised model (the global body with each trained client's layers).

    Arivazhagan, Aggarwal, Singh & Choudhary, "Federated Learning with Personalization Layers",
    arXiv:1912.00818, 2019.
    """

    name: ClassVar[str] = "private_head"
    guarantee = HEURISTIC

    def __init__(self, params: PrivateHeadParams, context: DefenseContext) -> None:
        self.params = params
        self.lr = context.federation.local.lr
        state = context.model.state_dict()
        if params.layers is None:
            head, _ = classifier_head(context.model)
            if not head:
                raise ValueError("the model is a single linear layer: nothing would be shared")
            prefixes: tuple[str, ...] = (head,)
        else:
            prefixes = params.layers
        self.prefixes = prefixes
        self.keys = private_keys(state, prefixes)
        param_names = context.param_names
        if param_names <= set(self.keys):
            raise ValueError("layers: every parameter would be private; nothing would be shared")
        self.param_keys = frozenset(k for k in self.keys if k in param_names)
        self.heads: dict[int, TensorDict] = {}

    @property
    def needs_loop_engine(self) -> bool:
        """The private layers are swapped in around each client's training."""
        return True

    def local_training(self, client: int, rnd: int) -> LocalTraining | None:
        """Train with the client's own private layers, and keep them afterwards."""
        return LocalTraining(context=self._personal(client))

    def _personal(self, client: int) -> Callable[[nn.Module], AbstractContextManager[None]]:
        @contextmanager
        def context(model: nn.Module) -> Iterator[None]:
            own = self.heads.get(client)
            if own is not None:
                model.load_state_dict(own, strict=False)
            yield
            trained = model.state_dict()
            self.heads[client] = {k: trained[k].detach().clone() for k in self.keys}

        return context

    def transform(
        self, update: ClientUpdate, *, rng: torch.Generator, local: LocalData
    ) -> ClientUpdate:
        """Zero the private tensors and withhold them (FedSGD: step the client's copy first)."""
        if update.kind == "gradient":
            own = self.heads.get(update.client_id) or {
                k: local.global_state[k].clone() for k in self.keys
            }
            self.heads[update.client_id] = {
                k: v - self.lr * update.tensors[k] if k in self.param_keys else v
                for k, v in own.items()
            }
        tensors = dict(update.tensors)
        for key in self.keys:
            tensors[key] = torch.zeros_like(tensors[key])
        return with_tensors(update, tensors, withheld=update.withheld | frozenset(self.keys))

    def evaluation_states(self, global_state: TensorDict) -> list[TensorDict] | None:
        """The global model with each trained client's private layers (None before any)."""
        if not self.heads:
            return None
        return [{**global_state, **self.heads[c]} for c in sorted(self.heads)]

    def describe(self) -> dict[str, Any]:
        """What stays on the client, what still leaves it, and how accuracy is measured."""
        return self.entry(
            notes=[
                f"{', '.join(self.keys)} train on each client and are never sent: the server "
                "sees neither their values nor their updates, so attacks that read the "
                "classifier head's gradient (label recovery) cannot run",
                "the rest of the model is federated as usual: its update is sent in full and "
                "gradient inversion still runs on it (with the initial global head in place "
                "of the client's, which the server does not know)",
                "test accuracy is the mean over the personalised models of the clients that "
                "have trained, measured on the shared test set, not on each client's own data",
                "place private_head before other client defenses, so they act on what is sent",
            ],
            warnings=[
                "no formal privacy guarantee: the shared layers' update still leaks the "
                "client's data (an input reconstructable from a first fully connected layer's "
                "gradient stays reconstructable)",
            ],
            params={"layers": list(self.prefixes)},
        )


@CLIENT_DEFENSES.register(
    "private_head",
    summary="keep some layers (default: the classifier head) on each client, never sent "
    "(FedPer, Arivazhagan et al. 2019); heuristic",
    params=PrivateHeadParams,
)
def build_private_head(params: PrivateHeadParams, context: DefenseContext) -> PrivateHead:
    """Resolve the private layers' keys in the run's model.

    Raises:
        ValueError: a prefix matches nothing, or nothing would be left to share.
    """
    return PrivateHead(params, context)
