"""Turn attack metrics into a plain risk level and findings a data owner can act on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

LEVELS = ("low", "medium", "high")

IMAGE_HIGH_PSNR = 20.0
"""dB at which reconstructions are typically recognisable (Geiping et al. 2020 report ~15–25)."""
IMAGE_HIGH_SSIM = 0.5
IMAGE_MEDIUM_PSNR = 15.0
LABEL_LEAK = 0.9
MEMBERSHIP_HIGH_TPR = 0.1
"""TPR at 1 % FPR at which membership inference is a high risk: ten times chance, so the attack
is confidently right about a tenth of the client's records (Carlini et al. 2022's yardstick)."""
MEMBERSHIP_MEDIUM_AUC = 0.6
INFERENCE_GAIN = 0.1
"""Accuracy above the no-model baseline at which a source or attribute inference is a finding."""


def assess(attacks: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The overall risk level (the worst finding) and one sentence per finding.

    Example:
        >>> assess([{"attack": "label_recovery", "status": "ok", "client": 0, "round": 1,
        ...          "metrics": {"label_accuracy": 1.0}}])["level"]
        'medium'
    """
    level = 0
    findings: list[str] = []
    for item in attacks:
        where = f"client {item['client']}, round {item['round']}"
        if item["status"] == "not_applicable":
            findings.append(f"{item['attack']} could not run ({where}): {item['reason']}.")
            continue
        if item["status"] == "failed":
            findings.append(f"{item['attack']} failed ({where}): {item['reason']}")
            continue
        m = item["metrics"]
        if "auc" in m:
            level = max(level, _binary_finding(item, where, findings))
        elif "gain" in m:
            if m["gain"] >= INFERENCE_GAIN:
                level = max(level, 1)
            findings.append(
                f"{item['attack']} answered the {item.get('question', 'inference')} question for "
                f"{m['accuracy']:.0%} of {where}'s candidates, {m['gain']:+.0%} over a guesser "
                f"that never saw the model ({m['baseline_accuracy']:.0%})."
            )
        elif "psnr" in m:
            if m["psnr"] >= IMAGE_HIGH_PSNR or m.get("ssim", 0.0) >= IMAGE_HIGH_SSIM:
                level = max(level, 2)
                findings.append(
                    f"{item['attack']} reconstructed the private images of {where} "
                    f"recognisably (PSNR {m['psnr']:.1f} dB, SSIM {m.get('ssim', 0.0):.2f})."
                )
            elif m["psnr"] >= IMAGE_MEDIUM_PSNR:
                level = max(level, 1)
                findings.append(
                    f"{item['attack']} recovered coarse structure of {where}'s images "
                    f"(PSNR {m['psnr']:.1f} dB, SSIM {m.get('ssim', 0.0):.2f})."
                )
            else:
                findings.append(
                    f"{item['attack']} did not reconstruct {where}'s images recognisably "
                    f"(PSNR {m['psnr']:.1f} dB, SSIM {m.get('ssim', 0.0):.2f})."
                )
        elif "label_accuracy" in m:
            if m["label_accuracy"] >= LABEL_LEAK:
                level = max(level, 1)
                findings.append(
                    f"{item['attack']} recovered {m['label_accuracy']:.0%} of the labels "
                    f"(e.g. diagnoses) of {where}'s examples."
                )
            else:
                findings.append(
                    f"{item['attack']} recovered {m['label_accuracy']:.0%} of {where}'s labels."
                )
    return {"level": LEVELS[level], "findings": findings}


def _binary_finding(item: Mapping[str, Any], where: str, findings: list[str]) -> int:
    """Append the finding of a yes/no inference attack; return its level (0, 1 or 2)."""
    m = item["metrics"]
    tpr = m.get("tpr_at_fpr_0.01", 0.0)
    if item.get("question") == "membership":
        what, apart = f"the membership of {where}'s records", f"{where}'s members apart"
    else:
        what = "which updates came from data with the property"
        apart = "updates with the property apart"
    numbers = f"AUC {m['auc']:.2f}, TPR {tpr:.1%} at 1% FPR"
    if tpr >= MEMBERSHIP_HIGH_TPR:
        findings.append(f"{item['attack']} inferred {what} confidently ({numbers}).")
        return 2
    if m["auc"] >= MEMBERSHIP_MEDIUM_AUC:
        findings.append(f"{item['attack']} inferred {what} ({numbers}).")
        return 1
    findings.append(f"{item['attack']} barely told {apart} ({numbers}).")
    return 0
