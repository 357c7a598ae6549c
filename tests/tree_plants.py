"""Planted wrong tree verifiers (negative controls). They exist only here: every test that proves a
verifier lossless must reject these on the same instances and sample sizes."""
from __future__ import annotations

import torch

from hsd.verify import tree_exact
from hsd.verify.tree import RecursiveRejection, Weighted


class LossyTranscription(Weighted):
    """A public transcription of Traversal Verification: after a failed child the parent's weight
    becomes min(1, S / (1 - q(x))), the remaining draft mass, instead of S / N (the rejection mass)."""

    name = "lossy-transcription"

    def update_parent(self, w, row, q_row, token):
        _, r, mass = super().update_parent(w, row, q_row, token)
        qx = torch.ones_like(w) if q_row is None else q_row.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        rest = 1.0 - qx
        w_new = torch.where(rest > 1e-12, (mass / rest.clamp_min(1e-300)).clamp(max=1.0), torch.zeros_like(mass))
        return w_new, r, mass


class WeightedNoRenorm(Weighted):
    """Weighted verifier that carries the unnormalised residual (w P - q)_+ to the next sibling."""

    name = "weighted-no-renormalisation"

    def update_parent(self, w, row, q_row, token):
        h, r, _ = super().update_parent(w, row, q_row, token)
        return h, r, torch.ones_like(h)  # the next sibling sees the residual unnormalised


class RRSNoRenorm(RecursiveRejection):
    """Recursive rejection sampling that tests the next sibling against (P - q)_+ unnormalised."""

    name = "rrs-no-renormalisation"

    def update_parent(self, w, row, q_row, token):
        h, r, _ = super().update_parent(w, row, q_row, token)
        return h, r, torch.ones_like(h)  # the next sibling sees the residual unnormalised


LOSSY_TRANSCRIPTION = LossyTranscription()
SAMPLER_PLANTS = {"weighted": [LOSSY_TRANSCRIPTION, WeightedNoRenorm()], "rrs": [RRSNoRenorm()]}


def reference_transcription(w, row, q_row, token):
    """The transcription's update in the reference law (tree_exact.weighted_update otherwise)."""
    w_ok, new_row = tree_exact.weighted_update(w, row, q_row, token)
    a = w.unsqueeze(1) * row - q_row
    s = a.clamp(min=0).sum(1)
    rest = 1.0 - q_row.gather(1, token.unsqueeze(1)).squeeze(1)
    return torch.where(rest > 1e-12, (s / rest.clamp(min=1e-300)).clamp(max=1.0), torch.zeros_like(s)), new_row


def reference_weighted_no_renorm(w, row, q_row, token):
    a = w.unsqueeze(1) * row - q_row
    w_new, _ = tree_exact.weighted_update(w, row, q_row, token)
    return w_new, a.clamp(min=0)


def reference_rrs_no_renorm(w, row, q_row, token):
    return w, (row - q_row).clamp(min=0)


REFERENCE_PLANTS = {"weighted": [reference_transcription, reference_weighted_no_renorm],
                    "rrs": [reference_rrs_no_renorm]}
