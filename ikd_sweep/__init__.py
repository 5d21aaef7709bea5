"""ikd-sweep: sweeps of Interactive Knowledge Distillation (IKD) vs KD, with Ray Tune and MLflow."""

__version__ = "0.1.0"
