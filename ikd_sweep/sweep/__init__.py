"""The sweep: the only Ray code (Ray Tune runs the trials; the driver records them in MLflow).

driver (phases, Tuner build/restore/fit, reconciliation with the store), worker (the trainable),
record (Tune callbacks over the trial recorder, and the listeners of the live view), cluster
(Ray start, resources, leftover sessions), search (grid, ASHA and Optuna searchers), events
(what a trial reports, Ray-free: the live view reads it too). This file imports nothing, so
`ikd_sweep.sweep.events` stays Ray-free.
"""
