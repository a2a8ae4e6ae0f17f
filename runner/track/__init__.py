"""What a run leaves to look at: the MLflow store with its disk spool (store), step metrics
(metrics), plots, sweep parent runs (sweep), and the studies built from finished runs
(report: the dice post; phase: the divisor's phase diagram; mechanism: why a shaper acts)."""
