"""Shared helpers of the benchmark scripts: data location, CIFAR-10 picks, machine facts."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def data_dir() -> Path:
    """$GRADAUDIT_DATA_DIR, else the workplace's ../shared/datasets."""
    env = os.environ.get("GRADAUDIT_DATA_DIR")
    return Path(env) if env else (REPO / ".." / "shared" / "datasets").resolve()


def cifar10_test_picks(per_class_index: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The `per_class_index`-th test image of every class, in pixel space (10, 3, 32, 32)."""
    path = data_dir() / "cifar10" / "cifar10_jpeg_test.npz"
    with np.load(path, allow_pickle=False) as npz:
        x, y, idx = npz["x_test"], npz["y_test"], npz["idx_in_class"]
        names = [str(n) for n in npz["label_names"]]
    rows = [int(np.flatnonzero((y == c) & (idx == per_class_index))[0]) for c in range(10)]
    images = x[rows].transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return images, y[rows].astype(np.int64), names


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def trained_convnet(width: int, epochs: int, *, seed: int = 0, examples: int = 1000):
    """Geiping's ConvNet trained `epochs` epochs on the first `examples` CIFAR-10 training
    images (SGD, lr 0.05, momentum 0.9, batch 64); cached in bench/.cache."""
    from gradaudit.data import load_dataset
    from gradaudit.models import build_model
    from gradaudit.seeding import torch_generator

    data = load_dataset("cifar10", data_dir())
    model = build_model(
        "convnet", {"width": width}, data.info, generator=torch_generator(seed, "model")
    )
    if epochs == 0:
        return model, None
    cache = REPO / "bench" / ".cache" / f"convnet{width}_e{epochs}_n{examples}_s{seed}.pt"
    if cache.is_file():
        model.load_state_dict(torch.load(cache, weights_only=True))
    else:
        x, y = data.x_train[:examples], data.y_train[:examples]
        optimiser = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        generator = torch_generator(seed, "bench-train")
        model.train()
        for _ in range(epochs):
            order = torch.randperm(examples, generator=generator)
            for start in range(0, examples, 64):
                batch = order[start : start + 64]
                optimiser.zero_grad()
                torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
                optimiser.step()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(data.x_test[i : i + 500]).argmax(1) == data.y_test[i : i + 500]).sum())
            for i in range(0, 2000, 500)
        )
    return model, correct / 2000
