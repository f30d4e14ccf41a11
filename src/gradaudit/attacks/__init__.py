"""Attacks on what the adversary observes: a registry of attack classes."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import BaseModel

from gradaudit.attacks.attribute import AttributeInferenceAttack, AttributeInferenceParams
from gradaudit.attacks.base import Attack
from gradaudit.attacks.inversion.analytic import AnalyticAttack, AnalyticParams
from gradaudit.attacks.inversion.codes import CategoricalCodesAttack, CategoricalCodesParams
from gradaudit.attacks.inversion.dlg import DLGAttack, DLGParams
from gradaudit.attacks.inversion.image import InvertingGradientsAttack, InvertingGradientsParams
from gradaudit.attacks.inversion.multimodal import (
    MultimodalInversionAttack,
    MultimodalInversionParams,
)
from gradaudit.attacks.inversion.prior import PriorInversionAttack, PriorInversionParams
from gradaudit.attacks.inversion.tabular import TabularInversionAttack, TabularInversionParams
from gradaudit.attacks.inversion.text import TextInversionAttack, TextInversionParams
from gradaudit.attacks.inversion.tokens import TextTokensAttack, TextTokensParams
from gradaudit.attacks.labels import LabelRecoveryAttack, LabelRecoveryParams
from gradaudit.attacks.membership.active import (
    MembershipActiveAttack,
    MembershipActiveParams,
)
from gradaudit.attacks.membership.lira import LiraAttack, LiraParams
from gradaudit.attacks.membership.passive import (
    MembershipGradientAttack,
    MembershipGradientParams,
    MembershipLossAttack,
    MembershipLossParams,
)
from gradaudit.attacks.membership.temporal import (
    MembershipTemporalAttack,
    MembershipTemporalParams,
)
from gradaudit.attacks.property import PropertyInferenceAttack, PropertyInferenceParams
from gradaudit.attacks.source import SourceInferenceAttack, SourceInferenceParams
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
ATTACKS.register(
    "text_tokens",
    summary="bag of words of the target's text batch from the token-embedding gradient's "
    "non-zero rows (Melis et al. 2019); exact counts and order for one sequence",
    params=TextTokensParams,
)(TextTokensAttack)
ATTACKS.register(
    "text_inversion",
    summary="the target's sentences, word order included: gradient matching over the token set "
    "with LAMP's discrete steps and an n-gram prior on public text (TAG, Deng et al. 2021; "
    "LAMP, Balunović et al. 2022)",
    params=TextInversionParams,
)(TextInversionAttack)
ATTACKS.register(
    "tabular_inversion",
    summary="tabular rows by cosine gradient matching over softmax-relaxed categories, pooled "
    "restarts, entropy confidence, domain-rule checks (TabLeak, Vero et al. 2023)",
    params=TabularInversionParams,
)(TabularInversionAttack)
ATTACKS.register(
    "categorical_codes",
    summary="which codes of each categorical column the batch held, from the first layer's "
    "zero and non-zero gradient rows (Melis et al. 2019)",
    params=CategoricalCodesParams,
)(CategoricalCodesAttack)

ATTACKS.register(
    "membership_loss",
    summary="membership of candidate records from one update: their loss drop from the global "
    "to the client's local model (Nasr et al. 2019 passive; Watson et al. 2022 calibration)",
    params=MembershipLossParams,
)(MembershipLossAttack)
ATTACKS.register(
    "membership_gradient",
    summary="membership from one update: each record's gradient cosine with the update, or its "
    "norm at the local model (Nasr et al. 2019 passive)",
    params=MembershipGradientParams,
)(MembershipGradientAttack)
ATTACKS.register(
    "membership_temporal",
    summary="membership from every round: the target's loss drop tested against the other "
    "clients' in each round, combined (FedMIA, Zhu et al. 2024)",
    params=MembershipTemporalParams,
)(MembershipTemporalAttack)
ATTACKS.register(
    "membership_active",
    summary="membership by a malicious server: gradient ascent on the candidates in the model "
    "sent to the target, then how far its training undoes it (Nasr et al. 2019 active)",
    params=MembershipActiveParams,
)(MembershipActiveAttack)
ATTACKS.register(
    "source_inference",
    summary="which client holds each candidate record: the record's loss drop under each "
    "client's local model, over rounds (Hu et al. 2021)",
    params=SourceInferenceParams,
)(SourceInferenceAttack)
ATTACKS.register(
    "attribute_inference",
    summary="a hidden sensitive attribute of the target's records from its updates, reported as "
    "the gain over a no-model baseline (Fredrikson et al. 2015, on updates)",
    params=AttributeInferenceParams,
)(AttributeInferenceAttack)
ATTACKS.register(
    "property_inference",
    summary="a property of the data behind each update (e.g. share of patients over 60), by a "
    "classifier on updates the server simulates from public data (Melis et al. 2019)",
    params=PropertyInferenceParams,
)(PropertyInferenceAttack)
ATTACKS.register(
    "lira",
    summary="Likelihood Ratio Attack: candidates' scaled-logit confidence against shadow models "
    "trained together with torch.func, on the final or the client's local model (Carlini et "
    "al. 2022)",
    params=LiraParams,
)(LiraAttack)
ATTACKS.register(
    "multimodal_inversion",
    summary="a record's structured fields and its note together from one update of a fusion "
    "model: one cosine gradient matching over TabLeak's relaxed fields and token embeddings "
    "restricted to the tokens present, then LAMP's discrete polish (Vero et al. 2023, TabLeak; "
    "Balunović et al. 2022, LAMP; Deng et al. 2021, TAG)",
    params=MultimodalInversionParams,
)(MultimodalInversionAttack)


def build_attack(kind: str, params: dict[str, object], *, where: str = "") -> Attack:
    """Validate `params` and construct the attack registered as `kind`."""
    spec = ATTACKS.parse_params(kind, params, where=where)
    return ATTACKS.get(kind)(spec)


__all__ = ["ATTACKS", "Attack", "build_attack"]
