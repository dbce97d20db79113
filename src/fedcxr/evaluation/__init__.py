"""Evaluation of trained models on the held-out, patient-disjoint test set."""
