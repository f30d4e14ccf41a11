"""Attacks on what the adversary observes: a registry of attack classes."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from gradaudit.attacks.base import Attack
from gradaudit.attacks.inversion.analytic import AnalyticAttack, AnalyticParams
from gradaudit.attacks.inversion.dlg import DLGAttack, DLGParams
from gradaudit.attacks.inversion.image import InvertingGradientsAttack, InvertingGradientsParams
from gradaudit.attacks.inversion.prior import PriorInversionAttack, PriorInversionParams
from gradaudit.attacks.labels import LabelRecoveryAttack, LabelRecoveryParams
from gradaudit.registry import Registry

ATTACKS: Registry[Callable[[BaseModel], Attack]] = Registry("attack")

ATTACKS.register(
    "label_recovery",
    summary="labels of the target's examples: iDLG at batch 1, counts with repeats above "
    "(bias gradient, LLG*)",
    params=LabelRecoveryParams,
)(LabelRecoveryAttack)
ATTACKS.register(
    "inverting_gradients",
    summary="image reconstruction by cosine gradient matching + TV (Geiping et al. 2020)",
    params=InvertingGradientsParams,
)(InvertingGradientsAttack)

ATTACKS.register(
    "analytic",
    summary="exact input of a model that starts with a linear layer, batch 1 (Phong et al. 2017)",
    params=AnalyticParams,
)(AnalyticAttack)
ATTACKS.register(
    "dlg",
    summary="Deep Leakage from Gradients: L2 matching, L-BFGS, joint labels (Zhu et al. 2019)",
    params=DLGParams,
)(DLGAttack)
ATTACKS.register(
    "prior_inversion",
    summary="gradient matching in the latent space of a VAE trained on granted public data, "
    "then per-image generator fine-tuning (GIAS, Jeon et al. 2021; GGL, Li et al. 2022)",
    params=PriorInversionParams,
)(PriorInversionAttack)


def build_attack(kind: str, params: dict[str, object], *, where: str = "") -> Attack:
    """Validate `params` and construct the attack registered as `kind`."""
    spec = ATTACKS.parse_params(kind, params, where=where)
    return ATTACKS.get(kind)(spec)


__all__ = ["ATTACKS", "Attack", "build_attack"]
