"""Learned Fourier circuits of a trained modular-addition network: detection, ablation, clock vs pizza.

Detection rule (documented in ``CIRCUIT_RULE``): frequency k is a learned circuit when
  1. its magnitude is an outlier among all frequencies: above median + 6·(1.4826·MAD) of the
     magnitudes (a robust 6σ: with (p−1)/2 ≤ 50 unlearned modes, chance alone essentially never
     crosses it), and at least 10% of the largest magnitude (weight decay leaves unlearned modes
     small but not zero; the relative floor keeps a flat spectrum from producing "outliers");
  2. its tokens' frequency-k components form a circle, not a line: roundness ≥ 0.5 (σ_min/σ_max of
     [Wᵀc_k, Wᵀs_k]). In trained networks the learned circles score 0.85–1, while large modes that
     carry only one phase (a line, not a circuit) score below 0.1; 0.5 sits in the gap.
  3. its plane is a plane of its own: taking candidates largest magnitude first, the part of
     span{Wᵀc_k, Wᵀs_k} outside the planes of the circuits already counted must still be a circle of at
     least ``MIN_INDEPENDENT`` of the candidate's own size (σ_min of the residual [Wᵀc_k, Wᵀs_k] ≥
     MIN_INDEPENDENT·σ_max of the unprojected pair).
Why 3: a circuit of frequency k needs a 2-D plane of the embedding R^e to hold its circle (cos and sin of
the same angle in two independent directions), and a second frequency drawn in a plane already taken is
leakage into that circle (or a superposition the next layer cannot read as a circle of its own), not a
second circuit. Distinct circuits thus
need independent planes, and R^e holds at most e/2 of them: with the study's e = 8, at most 4. Rules 1–2
alone counted 5 at p = 37 (seed 4) because leakage modes pass the magnitude and roundness tests in planes
already taken. Each counted circuit adds 2 orthonormal directions to the span, so the count cannot exceed
⌊e/2⌋ by construction (and ``learned_frequencies`` also stops there).
Circularity (how clean the circle looks in its plane, with leakage from modes sharing it) is reported
and drawn, not used for the decision: with e = 8 several modes share embedding directions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import FastLLCError
from .fourier import FourierModes, fourier_modes, keep_frequencies

OUTLIER_SIGMAS = 6.0
RELATIVE_FLOOR = 0.10
MIN_ROUNDNESS = 0.5
MIN_INDEPENDENT = 0.4  # on the 35 p-sweep networks: own planes 0.64–1.0, leakage modes 0–0.2
CIRCUIT_RULE = (f"magnitude > median + {OUTLIER_SIGMAS:g}·1.4826·MAD and ≥ {RELATIVE_FLOOR:.0%} of the largest, "
                f"roundness ≥ {MIN_ROUNDNESS:g}, and a plane of its own (the part outside the planes of larger "
                f"circuits ≥ {MIN_INDEPENDENT:g} of its size; at most e/2 circuits)")


def candidate_frequencies(modes: FourierModes) -> list[int]:
    """The frequencies that pass rules 1–2 (outlier magnitude, round), largest magnitude first: the count
    before the plane-of-its-own rule, which could exceed what the embedding holds."""
    m = modes.magnitudes
    median = np.median(m)
    spread = 1.4826 * np.median(np.abs(m - median))
    threshold = max(median + OUTLIER_SIGMAS * spread, RELATIVE_FLOOR * m.max())
    chosen = [int(k) for k, mag, round_ in zip(modes.frequencies, m, modes.roundness)
              if mag > threshold and round_ >= MIN_ROUNDNESS]
    return sorted(chosen, key=lambda k: -modes.magnitude(k))


def learned_frequencies(modes: FourierModes) -> list[int]:
    """The frequencies that pass ``CIRCUIT_RULE`` (rules 1–3), largest magnitude first; never more than
    ⌊e/2⌋ of them (a circuit needs a plane of its own, and R^e holds e/2 independent planes)."""
    if modes.pairs is None:  # built without its projections: rules 1-2 only cannot bound the count
        raise ValueError("learned_frequencies needs FourierModes.pairs (use fourier_modes)")
    embed = modes.pairs.shape[1]
    span = np.zeros((embed, 0))  # orthonormal basis of the planes counted so far
    learned = []
    for k in candidate_frequencies(modes):
        if len(learned) == embed // 2:  # R^e is full: the residual below would be 0 anyway
            break
        pair = modes.pairs[k - 1]  # [e, 2]: Wᵀc_k, Wᵀs_k
        residual = pair - span @ (span.T @ pair)
        size = np.linalg.svd(pair, compute_uv=False)[0]
        if size == 0 or np.linalg.svd(residual, compute_uv=False)[1] < MIN_INDEPENDENT * size:
            continue
        basis, _ = np.linalg.qr(residual)
        span = np.concatenate([span, basis], axis=1)
        learned.append(k)
    return learned


@torch.no_grad()
def test_loss_with_embedding(model, W: np.ndarray, pairs: torch.Tensor, labels: torch.Tensor) -> float:
    """Cross-entropy of ``model`` on (pairs, labels) with its embedding replaced by ``W``."""
    original = model.embed.weight.detach().clone()
    try:
        model.embed.weight.copy_(torch.as_tensor(W, dtype=original.dtype))
        return F.cross_entropy(model(pairs), labels).item()
    finally:
        model.embed.weight.copy_(original)


def ablation_losses(model, pairs, labels) -> np.ndarray:
    """[K]: loss when the embedding keeps only DFT components 0, k and p−k, for each k."""
    W = model.embed.weight.detach().double().numpy()
    ks = range(1, (W.shape[0] - 1) // 2 + 1)
    return np.array([test_loss_with_embedding(model, keep_frequencies(W, [k]), pairs, labels) for k in ks])


def _folded(frequency: int, p: int) -> int:
    frequency %= p
    return min(frequency, p - frequency)


@torch.no_grad()
def clock_or_pizza(model, k: int) -> tuple[str, float]:
    """EXPERIMENTAL. Power at 2k relative to k in the hidden activations over b (fixed a), for the neurons
    whose a-side input is dominated by frequency k. A clock circuit concentrates on k (ratio < 0.5); a pizza
    circuit shows 2k as well (ratio ≥ 0.5). The GELU's own square term also makes 2k, so the threshold is a
    heuristic: trust the ratio's order across circuits more than the label."""
    p = model.p
    E = model.embed.weight
    side_a = (E @ model.left.weight.T + model.left.bias).double()  # [p, h] pre-activation from a
    side_b = (E @ model.right.weight.T + model.right.bias).double()
    spectrum = np.abs(np.fft.rfft(side_a.numpy() - side_a.numpy().mean(0), axis=0)) ** 2  # [p//2+1, h]
    neurons = np.where(spectrum[1:].argmax(axis=0) + 1 == k)[0]
    if len(neurons) == 0:
        return "none", math.nan
    hidden = F.gelu(side_a[:, None, neurons] + side_b[None, :, neurons]).numpy()  # [a, b, n]
    power = np.abs(np.fft.fft(hidden - hidden.mean(axis=1, keepdims=True), axis=1)) ** 2  # over b
    at = lambda f: power[:, f].mean()  # noqa: E731 (a, neuron) averaged
    ratio = float(at(_folded(2 * k, p)) / at(k)) if at(k) > 0 else math.nan
    return ("pizza" if ratio >= 0.5 else "clock"), ratio


@dataclass
class CircuitReport:
    p: int
    task: str
    checkpoint: int
    step: int
    frequencies: list[int]  # all k = 1 … (p−1)/2
    magnitudes: list[float]
    roundness: list[float]
    circularity: list[float]
    learned: list[int]
    count: int
    ablation_test_loss: list[float]  # keep only mode k: test loss, per k
    full_test_loss: float
    learned_only_test_loss: float | None  # keep all learned modes (and the constant) together
    candidates: list[int] = field(default_factory=list)  # rules 1-2 only (the count before the plane-of-its-own rule)
    clock_or_pizza: dict = field(default_factory=dict)  # k → [label, 2k/k power ratio] (experimental)
    rule: str = CIRCUIT_RULE
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def analyse(model, pairs_test, labels_test, *, task: str = "add", checkpoint: int = -1, step: int = -1) -> CircuitReport:
    """Fourier modes, learned circuits and mode ablation of a trained ``ModularMLP``."""
    W = model.embed.weight.detach().double().numpy()
    modes = fourier_modes(W)
    learned = learned_frequencies(modes)
    candidates = candidate_frequencies(modes)
    ablation = ablation_losses(model, pairs_test, labels_test)
    full = test_loss_with_embedding(model, W, pairs_test, labels_test)
    together = None
    if learned:
        together = test_loss_with_embedding(model, keep_frequencies(W, learned), pairs_test, labels_test)
    note = ""
    if task != "add":
        note = "a random operation has no Fourier structure: no circuits are expected"
    elif not learned:
        note = "no frequency passes the rule: the network has not (yet) learned Fourier circuits"
    return CircuitReport(
        p=modes.p, task=task, checkpoint=checkpoint, step=step, frequencies=modes.frequencies.tolist(),
        magnitudes=modes.magnitudes.tolist(), roundness=modes.roundness.tolist(),
        circularity=modes.circularity.tolist(), learned=learned,
        count=len(learned), ablation_test_loss=ablation.tolist(), full_test_loss=full,
        learned_only_test_loss=together, candidates=candidates, clock_or_pizza={k: list(clock_or_pizza(model, k)) for k in learned},
        note=note)


def analyse_run(run, checkpoint: int | None = None) -> tuple[CircuitReport, FourierModes]:
    """``analyse`` at a checkpoint of a training run (default: final), on its test split."""
    index = run.checkpoint_index(checkpoint)
    if run.config.p < 3:
        raise FastLLCError(f"circuit analysis needs p >= 3 (a frequency with a cos/sin pair), got p = {run.config.p}")
    model = run.load_model(index)
    pairs, labels = run.task().test_data()
    if labels.numel() == 0:
        raise FastLLCError("the run has no test examples to measure ablations on (train fraction 1)")
    report = analyse(model, pairs, labels, task=run.config.task, checkpoint=index, step=run.steps[index])
    return report, fourier_modes(model.embed.weight.detach().double().numpy())


def circuits_over_training(run) -> list[CircuitReport]:
    """``analyse_run`` at every checkpoint of a run: magnitudes, learned modes and ablation along training."""
    return [analyse_run(run, k)[0] for k in range(len(run.steps))]
