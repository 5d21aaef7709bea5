"""Distillation losses and the IKD exam-step hypergradient."""
