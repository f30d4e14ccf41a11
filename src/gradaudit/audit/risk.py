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
ROWS_HIGH = 0.9
"""Feature accuracy at which reconstructed table rows are the patients' records (TabLeak reports
95 % at batch 8 on Adult)."""
ROWS_GAIN = 0.1
"""Feature accuracy above the random baseline from which a row reconstruction is a finding."""
TEXT_HIGH_ROUGE1 = 0.8
"""ROUGE-1 at which a reconstructed note holds most of the original's words."""
TEXT_MEDIUM_ROUGE1 = 0.5
BAG_HIGH = 0.9
"""Recall and precision at which the bag of tokens or codes discloses what the batch held."""
BAG_MEDIUM_F1 = 0.25
"""F1 of recall and precision from which a bag with half the true items discloses part of what
the batch held: a bag that names the whole vocabulary (noise keeps every embedding row) has
recall 1 and chance precision, and tells nothing."""
INPUT_METRICS = ("feature_accuracy", "rouge1", "token_recall", "code_recall")
"""Metrics of reconstructed rows, text and bags (`_input_findings`)."""


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
        elif any(k in m for k in INPUT_METRICS):
            level = max(level, _input_findings(item, where, findings))
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


def _input_findings(item: Mapping[str, Any], where: str, findings: list[str]) -> int:
    """Append the findings of a row, text or bag reconstruction (each modality it recovered);
    return the highest level among them."""
    m, name = item["metrics"], item["attack"]
    level = 0
    if "feature_accuracy" in m:
        acc, base = m["feature_accuracy"], m.get("feature_accuracy_random")
        versus = f" against {base:.0%} for random rows" if base is not None else ""
        if acc >= ROWS_HIGH:
            level = max(level, 2)
            findings.append(
                f"{name} reconstructed the records of {where}: {acc:.0%} of the "
                f"features right{versus}."
            )
        elif base is None or acc - base >= ROWS_GAIN:
            level = max(level, 1)
            findings.append(
                f"{name} recovered part of {where}'s records: {acc:.0%} of the "
                f"features right{versus}."
            )
        else:
            findings.append(
                f"{name} did no better than random rows on {where}'s records ({acc:.0%}{versus})."
            )
    if "rouge1" in m:
        rouge = f"ROUGE-1 {m['rouge1']:.2f}, ROUGE-2 {m.get('rouge2', 0.0):.2f}"
        if m["rouge1"] >= TEXT_HIGH_ROUGE1:
            level = max(level, 2)
            findings.append(f"{name} reconstructed the text of {where} ({rouge}).")
        elif m["rouge1"] >= TEXT_MEDIUM_ROUGE1:
            level = max(level, 1)
            findings.append(f"{name} recovered much of the wording of {where}'s text ({rouge}).")
        else:
            findings.append(f"{name} recovered little of {where}'s text ({rouge}).")
    for item_kind, what in (("token", "words"), ("code", "categorical codes (e.g. diagnoses)")):
        recall, precision = m.get(f"{item_kind}_recall"), m.get(f"{item_kind}_precision")
        if recall is None or precision is None or "rouge1" in m:
            continue
        numbers = f"recall {recall:.0%}, precision {precision:.0%}"
        f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
        if recall >= BAG_HIGH and precision >= BAG_HIGH:
            level = max(level, 2)
            findings.append(f"{name} disclosed which {what} {where}'s data contained ({numbers}).")
        elif recall >= TEXT_MEDIUM_ROUGE1 and f1 >= BAG_MEDIUM_F1:
            level = max(level, 1)
            findings.append(f"{name} disclosed part of the {what} in {where}'s data ({numbers}).")
        else:
            findings.append(
                f"{name} could not tell which {what} were in {where}'s data ({numbers})."
            )
    return level
