"""``misalign_score``'s combination in one line of words, from the record the audit keeps
(``audit.json``, the shards' metadata): what the CLI, the app and the demo print."""

from __future__ import annotations

from collections.abc import Mapping

ALONE_BECAUSE = {  # ``misalign.probes_alone``'s reasons, as the CLI and the app say them
    "one mode": "has one mode (no group apart)",
    "split not trusted, no validation set": "is not trusted, and without a validation set "
    "none of its signals sees noise the probes cannot",
}


def describe_combination(record: Mapping) -> str:
    """One line: how misalign_score was made from the signals (named by their table columns:
    the influence slot holds ``self_influence`` in an audit without a validation set), and how
    noisy the validation pairs look where the twin audit measured it."""
    found = record.get("validation_noise")
    if not found:
        return _signals_text(record)
    low, high = found["interval"]
    return (
        f"{_signals_text(record)}; validation pairs: about {found['rate']:.0%} look noisy "
        f"(95% interval {low:.0%}-{high:.0%})"
    )


def _signals_text(record: Mapping) -> str:
    column = {"influence": record.get("influence_column", "influence")}
    if record.get("kind") == "mixture":
        names = [column.get(k, k) for k in record["signals"]]
        mixture = (
            f"two-Gaussian mixture over {', '.join(names)} "
            f"(suspects {record['weights'][1]:.1%}, separation {record['separation']:.2f})"
        )
        probes = record.get("probe_weights")
        weighted = ""
        if probes:
            terms = ", ".join(
                f"{w:+.2f} {column.get(k, k)}" for k, w in zip(probes["signals"], probes["weights"])
            )
            weighted = f"sum of its features weighted by planted probes ({terms}; "
            weighted += f"{probes['probes']} probes"
            if probes.get("clean"):
                weighted += f" told from {probes['clean']} held-out validation pairs"
                if probes.get("penalty") is not None:
                    weighted += ", corrected by the real pairs against them"
            if probes.get("dropped"):
                weighted += f", refit without the {probes['dropped']} most suspect real rows"
            weighted += ")"
            if probes["parts"] == ["probe_weighted_features"]:
                why = probes.get("alone_because") or "one mode"
                why = ALONE_BECAUSE.get(why, why)
                return f"the {weighted}, alone: the {mixture} {why}"
        what = f"log-odds of the suspect component of a {mixture}"
        if record.get("hedge"):
            what = (
                f"standardised {what} plus the standardised equal-weight sum of its features "
                "(the mixture's split is not trusted)"
            )
        if probes:
            what = what if record.get("hedge") else f"standardised {what}"
            what = f"{what}; plus the standardised {weighted}"
        return what
    used = [f"{w:g} x {k}" for k, w in (record.get("weights") or {}).items() if w]
    why = f" ({record['why']})" if record.get("why") else ""
    return "sum of standardised " + (" + ".join(used) if used else "nothing") + why
