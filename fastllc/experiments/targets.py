"""What the reproduction is held to: the study's published figures beyond the per-job values its records
carry (``published``), the tolerances of each target, and the pass/fail verdicts. ``report`` renders
them; nothing here formats text or draws, and nothing here imports ``report``.

The verdicts take the numbers ``report`` computes for its tables (summary rows {p, mean, published} per p,
fitted slopes and R²), so that a table and the verdict beside it are read from the same numbers.
"""

from __future__ import annotations

import math

# which runs the study's claims are about (their λ̂ is shown beside the others', never averaged with them)
GENERALISED_TEST_ACCURACY = 0.99  # modular addition: final test accuracy at least this
MEMORISED_TRAIN_ACCURACY = 1.0  # the random operation: final train accuracy at least this

# the study's SGLD settings that its figures never varied (a variant that changes them says so in its label)
STUDY_EPSILON, STUDY_GAMMA = 1e-3, 5.0

# the study's published figures
PUBLISHED_PSWEEP_FIT = dict(slope=8.60, intercept=-90)  # λ̂ ≈ 8.6·p − 90 over the psweep's means
AUTHORS_CIRCUITS_P53 = [3, 3, 2, 3, 3]  # the authors' recorded counts for their five p = 53 runs (seed_results.json)
MEMORISATION_CLAIM = dict(a=0.8, ps=(10, 25), network=(50, 200))  # λ̂ ≈ 0.8·p² (the train-set size) of e50/h200
# networks, fitted over p ∈ [10, 25]

# the reproduction's targets
PSWEEP_TARGETS = dict(mean_within=0.05, slope=(8.6, 0.4), r2=0.98)
ARCHITECTURES_TARGET = dict(network=(8, 32), primes=(23, 37), within=0.10)
MEMORIZATION_TARGETS = dict(primes=(10, 15, 20, 25), within=0.10, a=(0.85, 1.05))


def generalised(record) -> bool:
    """The run's network generalised (final test accuracy ≥ ``GENERALISED_TEST_ACCURACY``)."""
    return record.get("final_metrics", {}).get("test_acc", 0) >= GENERALISED_TEST_ACCURACY


def memorised(record) -> bool:
    """The run's network memorised its train set (final train accuracy ≥ ``MEMORISED_TRAIN_ACCURACY``)."""
    return record.get("final_metrics", {}).get("train_acc", 0) >= MEMORISED_TRAIN_ACCURACY


def in_claim_range(p: int) -> bool:
    """Whether λ̂ at ``p`` enters the fit of the memorisation claim."""
    low, high = MEMORISATION_CLAIM["ps"]
    return low <= p <= high


def psweep_verdict(rows, slope: float, r2_all: float) -> dict | None:
    """The p-sweep's targets, each met or not: every mean within ``mean_within`` of the published one (the
    largest difference and its p), the slope of the fit over all runs within its band, that fit's R²;
    None where no p has a published value."""
    compared = [(r["p"], r["mean"] / r["published"] - 1) for r in rows if r["published"]]
    if not compared:
        return None
    worst_p, worst = max(compared, key=lambda t: abs(t[1]))
    target, width = PSWEEP_TARGETS["slope"]
    return dict(worst_p=worst_p, worst=worst, means_met=abs(worst) <= PSWEEP_TARGETS["mean_within"],
                slope=slope, slope_met=abs(slope - target) <= width, r2=r2_all, r2_met=r2_all >= PSWEEP_TARGETS["r2"])


def architectures_verdict(rows_by_network: dict) -> dict | None:
    """The architectures target: the target network's mean at each target p within ``within`` of the
    published single run. ``rows_by_network``: {(e, h): summary rows}. None where none can be compared."""
    network, primes = ARCHITECTURES_TARGET["network"], ARCHITECTURES_TARGET["primes"]
    differences = []
    for row in rows_by_network.get(network, []):
        ratio = row["mean"] / row["published"] if row["published"] else None
        if row["p"] in primes and ratio:
            differences.append((row["p"], ratio - 1))
    if not differences:
        return None
    return dict(differences=differences, met=all(abs(d) <= ARCHITECTURES_TARGET["within"] for _, d in differences))


def memorization_verdict(memo: dict, a: float, network: tuple[int, int] = MEMORISATION_CLAIM["network"]) -> dict | None:
    """The memorisation targets: the mean at each target p within ``within`` of the published value, and the
    claim's fitted a (λ̂ ≈ a·p² + c) within its band, the latter for the claim's network only (``a_met`` None
    for another: the study's e16/h64 values are single runs with a curve of their own). ``memo``: {p: summary
    row} of the random operation. None where no target p has a published value or there is no fit."""
    compared = [(p, memo[p]["mean"] / memo[p]["published"] - 1) for p in MEMORIZATION_TARGETS["primes"]
                if p in memo and memo[p]["published"]]
    if not compared or math.isnan(a):
        return None
    low, high = MEMORIZATION_TARGETS["a"]
    return dict(differences=compared, means_met=all(abs(d) <= MEMORIZATION_TARGETS["within"] for _, d in compared),
                a=a, a_met=low <= a <= high if tuple(network) == MEMORISATION_CLAIM["network"] else None)
