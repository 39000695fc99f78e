"""Benchmark metrics and drivers: the code behind docs/BENCHMARKS.md, importable and tested.

One idea per module: ``lds`` (linear datamodeling score), ``removal`` (remove-and-retrain counterfactuals),
``mislabel`` (self-influence against injected flips), ``shortcut`` (sample-level AUPRC, detector matching),
``pixel`` (pointing game, mass/peak in a box, insertion/deletion, randomisation similarity), ``docs`` (writing one
section of the benchmarks page). ``digits`` is the one place that imports the digits demo pieces the benchmarks
train on. Everything here calls the entry points users call (``influence.build``, ``Influence.scores``,
``Influence.self_influence``, ``influence.flag.flag_shortcuts``); the scripts under scripts/ are argparse shells.
"""
