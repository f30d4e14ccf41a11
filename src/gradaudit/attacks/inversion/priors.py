"""Generative image priors that an adversary trains on public data, cached on disk.

The prior of `prior_inversion` is a small class-conditional variational auto-encoder (Kingma &
Welling, "Auto-Encoding Variational Bayes", ICLR 2014; conditioned on the label as in Sohn et
al., "Learning Structured Output Representation using Deep Conditional Generative Models",
NeurIPS 2015). Its decoder maps a latent code and a label to an image in pixel space [0, 1]; the
attack searches that decoder's latent space (GIAS, Jeon et al. 2021; GGL, Li et al. 2022).

Training takes seconds to a minute or two on a CPU and happens once: the trained weights are
cached under ``$GRADAUDIT_CACHE_DIR`` (else ``~/.cache/gradaudit``), keyed by a hash of
everything that determines them (`PriorConfig`, including a fingerprint of the public data).
Cache files are written atomically and read with ``torch.load(..., weights_only=True)``; a file
that cannot be read or does not match its key is a cache miss (with a logged warning), never an
error.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from gradaudit.audit.io import atomic_write_bytes
from gradaudit.models.init import init_parameters_
from gradaudit.seeding import torch_generator

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "GRADAUDIT_CACHE_DIR"
PRIOR_FORMAT = 1
"""Revision of the prior's architecture and training code; part of the cache key."""


class PriorConfig(BaseModel):
    """Everything that determines a trained prior; its hash is the cache key.

    Attributes:
        dataset: the dataset the public data comes from.
        fingerprint: `data_fingerprint` of the examples the prior trains on.
        input_shape: the shape of one image, (C, H, W).
        num_classes: the number of labels the decoder is conditioned on.
        latent_dim: the size of the latent code.
        width: channels of the decoder's first transposed convolution's output.
        epochs: passes over the public examples.
        batch_size: examples per step.
        lr: Adam step size.
        beta: weight of the KL term of the evidence lower bound.
        seed: seed of the training stream (initialisation, shuffling, sampling).
        examples: the number of public examples trained on.
        format: `PRIOR_FORMAT` of the code that trained it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    dataset: str
    fingerprint: str
    input_shape: tuple[int, int, int]
    num_classes: int
    latent_dim: int
    width: int
    epochs: int
    batch_size: int
    lr: float
    beta: float
    seed: int
    examples: int
    format: int = PRIOR_FORMAT


def cache_dir() -> Path:
    """Where cached priors live: ``$GRADAUDIT_CACHE_DIR``, else ``~/.cache/gradaudit``."""
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gradaudit"


def data_fingerprint(x: Tensor, y: Tensor) -> str:
    """A SHA-256 of the inputs' and labels' shapes and float32/int64 bytes.

    Example:
        >>> a = data_fingerprint(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
        >>> a == data_fingerprint(torch.zeros(2, 1, 2, 2), torch.tensor([0, 1]))
        True
        >>> a == data_fingerprint(torch.zeros(2, 1, 2, 2), torch.tensor([1, 0]))
        False
    """
    digest = hashlib.sha256()
    for tensor, dtype in ((x, torch.float32), (y, torch.int64)):
        array = tensor.detach().to(dtype).contiguous().numpy()
        digest.update(repr(tuple(array.shape)).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def prior_key(config: PriorConfig) -> str:
    """The cache key of `config`: a SHA-256 of its fields as sorted JSON."""
    text = json.dumps(config.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def prior_path(config: PriorConfig, root: Path | None = None) -> Path:
    """The cache file of `config` under `root` (default `cache_dir()`)."""
    return (root or cache_dir()) / "priors" / f"cvae-{prior_key(config)[:32]}.pt"


def _downsampled(size: int) -> int:
    """Spatial size after two stride-2 convolutions with kernel 4 and padding 1."""
    return (size // 2) // 2


class ConvDecoder(nn.Module):
    """Latent code and one-hot label to an image in [0, 1]: linear, 2 transposed convs, conv.

    The first feature map is ``ceil(H/4) x ceil(W/4)``; two stride-2 transposed convolutions
    upsample it by 4, and the output is cropped to ``H x W`` (8x8, 28x28 and 32x32 need no crop).
    """

    def __init__(
        self, latent_dim: int, num_classes: int, input_shape: tuple[int, int, int], width: int
    ) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        self.shape = input_shape
        self.start = (2 * width, math.ceil(height / 4), math.ceil(width_px / 4))
        self.fc = nn.Linear(latent_dim + num_classes, math.prod(self.start))
        self.up1 = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(width, width, 4, stride=2, padding=1)
        self.out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, z: Tensor, onehot: Tensor) -> Tensor:
        """Images (N, C, H, W) in [0, 1] for codes ``z`` (N, latent) and labels (N, classes)."""
        h = nn.functional.silu(self.fc(torch.cat([z, onehot], dim=1)))
        h = h.reshape(-1, *self.start)
        h = nn.functional.silu(self.up1(h))
        h = nn.functional.silu(self.up2(h))
        _, height, width = self.shape
        return torch.sigmoid(self.out(h)[:, :, :height, :width])


class ConvEncoder(nn.Module):
    """Image and one-hot label to the mean and log-variance of the latent posterior."""

    def __init__(
        self, latent_dim: int, num_classes: int, input_shape: tuple[int, int, int], width: int
    ) -> None:
        super().__init__()
        channels, height, width_px = input_shape
        self.conv1 = nn.Conv2d(channels, width, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)
        flat = 2 * width * _downsampled(height) * _downsampled(width_px)
        self.fc = nn.Linear(flat + num_classes, 2 * latent_dim)

    def forward(self, x: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        """``(mu, logvar)``, each (N, latent), for images ``x`` in [0, 1]."""
        h = nn.functional.silu(self.conv1(x))
        h = nn.functional.silu(self.conv2(h)).flatten(1)
        mu, logvar = self.fc(torch.cat([h, onehot], dim=1)).chunk(2, dim=1)
        return mu, logvar.clamp(-10.0, 10.0)


class ConditionalVAE(nn.Module):
    """A class-conditional VAE: `ConvEncoder` and `ConvDecoder` sharing the label."""

    def __init__(
        self, latent_dim: int, num_classes: int, input_shape: tuple[int, int, int], width: int
    ) -> None:
        super().__init__()
        self.encoder = ConvEncoder(latent_dim, num_classes, input_shape, width)
        self.decoder = ConvDecoder(latent_dim, num_classes, input_shape, width)


def build_vae(config: PriorConfig, generator: torch.Generator) -> ConditionalVAE:
    """The untrained VAE of `config`, initialised from `generator` only (not the global RNG)."""
    if min(config.input_shape[1:]) < 4:
        raise ValueError(f"images of shape {config.input_shape} are too small for the prior")
    with torch.device("meta"):
        vae = ConditionalVAE(
            config.latent_dim, config.num_classes, config.input_shape, config.width
        )
    vae.to_empty(device="cpu")
    init_parameters_(vae, generator)
    return vae


def elbo_loss(recon: Tensor, x: Tensor, mu: Tensor, logvar: Tensor, beta: float) -> Tensor:
    """Negative evidence lower bound per image: summed pixel BCE plus ``beta`` times the KL.

    Example:
        >>> x = torch.full((1, 1, 2, 2), 0.5)
        >>> z = torch.zeros(1, 3)
        >>> round(float(elbo_loss(x, x, z, z, 1.0)), 4)  # 4 pixels of BCE(0.5, 0.5) = ln 2; KL 0
        2.7726
    """
    bce = nn.functional.binary_cross_entropy(recon, x, reduction="sum") / x.shape[0]
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum() / x.shape[0]
    return bce + beta * kl


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """Float one-hot rows of `labels`."""
    return nn.functional.one_hot(labels.long(), num_classes).float()


def train_vae(config: PriorConfig, x: Tensor, y: Tensor) -> tuple[ConditionalVAE, float]:
    """Train the VAE of `config` on pixel-space images ``x`` in [0, 1] with labels ``y``.

    Every random draw (initialisation, shuffling, reparameterisation noise) comes from
    ``torch_generator(config.seed, "prior", config.dataset)``.

    Returns:
        The trained VAE (in eval mode) and the mean loss of its last epoch.
    """
    generator = torch_generator(config.seed, "prior", config.dataset)
    vae = build_vae(config, generator)
    optimiser = torch.optim.Adam(vae.parameters(), lr=config.lr)
    onehot = one_hot(y, config.num_classes)
    last = float("nan")
    for _epoch in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        total = 0.0
        for start in range(0, x.shape[0], config.batch_size):
            idx = order[start : start + config.batch_size]
            mu, logvar = vae.encoder(x[idx], onehot[idx])
            noise = torch.randn(mu.shape, generator=generator)
            recon = vae.decoder(mu + noise * (0.5 * logvar).exp(), onehot[idx])
            loss = elbo_loss(recon, x[idx], mu, logvar, config.beta)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * idx.shape[0]
        last = total / x.shape[0]
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae, last


@dataclass(frozen=True)
class TrainedPrior:
    """A prior ready for an attack.

    Attributes:
        decoder: the generator, frozen, in eval mode.
        config: what it was trained with.
        key: its cache key.
        path: its cache file.
        from_cache: whether it was read from the cache rather than trained now.
        seconds: seconds spent loading or training it.
        final_loss: the mean negative ELBO of its last training epoch.
    """

    decoder: ConvDecoder
    config: PriorConfig
    key: str
    path: Path
    from_cache: bool
    seconds: float
    final_loss: float


def _serialise(vae: ConditionalVAE, config: PriorConfig, key: str, final_loss: float) -> bytes:
    buffer = io.BytesIO()
    payload = {
        "format": PRIOR_FORMAT,
        "key": key,
        "config": json.dumps(config.model_dump(mode="json"), sort_keys=True),
        "final_loss": final_loss,
        "state": vae.state_dict(),
    }
    torch.save(payload, buffer)
    return buffer.getvalue()


def _read_cached(path: Path, config: PriorConfig, key: str) -> tuple[ConditionalVAE, float] | None:
    """The cached VAE of `config`, or None (with a warning) when the file is unusable."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("key") != key:
            raise ValueError("the file does not hold the prior of this configuration")
        vae = build_vae(config, torch.Generator())
        vae.load_state_dict(payload["state"], strict=True)
        final_loss = float(payload["final_loss"])
    except Exception as exc:  # any unreadable cache file is a miss, never a crash
        logger.warning("ignoring the unusable cached prior %s (%s); training it again", path, exc)
        return None
    vae.eval()
    for p in vae.parameters():
        p.requires_grad_(False)
    return vae, final_loss


def load_or_train_prior(
    config: PriorConfig, x: Tensor, y: Tensor, *, root: Path | None = None
) -> TrainedPrior:
    """The prior of `config`: from the cache if a usable file is there, else trained and cached.

    Args:
        config: the training configuration; ``config.fingerprint`` must be that of ``(x, y)``.
        x: public images in pixel space [0, 1], (N, C, H, W).
        y: their labels.
        root: the cache directory (default `cache_dir()`).

    Raises:
        ValueError: ``(x, y)`` is not the data that `config` describes.
    """
    if data_fingerprint(x, y) != config.fingerprint or x.shape[0] != config.examples:
        raise ValueError("the public data does not match the prior's configuration")
    started = time.perf_counter()
    key = prior_key(config)
    path = prior_path(config, root)
    cached = _read_cached(path, config, key) if path.is_file() else None
    if cached is not None:
        vae, final_loss = cached
        logger.info("prior %s read from the cache %s", key[:12], path)
        return TrainedPrior(
            vae.decoder, config, key, path, True, time.perf_counter() - started, final_loss
        )
    logger.info("training the prior %s on %d public examples", key[:12], x.shape[0])
    vae, final_loss = train_vae(config, x, y)
    atomic_write_bytes(path, _serialise(vae, config, key, final_loss))
    return TrainedPrior(
        vae.decoder, config, key, path, False, time.perf_counter() - started, final_loss
    )
