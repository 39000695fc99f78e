"""Benchmark metrics and drivers: the code behind docs/BENCHMARKS.md, importable and tested.

Metrics, one idea per module: ``lds`` (linear datamodeling score), ``removal`` (remove-and-retrain
counterfactuals), ``mislabel`` (self-influence against injected flips), ``shortcut`` (sample-level AUPRC, detector
matching), ``pixel`` (pointing game, mass/peak in a box, insertion/deletion, μ-fidelity, randomisation similarity),
``store_bytes`` (two stores' files compared by sha256 up to their random generation tokens).
Drivers: ``lds_study`` (the LDS study's cached stages and report), ``shortcut_study`` (patched and clean demo
runs), ``attribution_study`` (the pixel-attribution protocols), ``peers`` (adapters for other attribution
libraries), ``docs`` (writing one section of the benchmarks page). ``digits`` is the one place that imports the digits demo pieces the benchmarks train on.

Everything calls the entry points users call (``influence.build``, ``Influence.scores``,
``Influence.self_influence``, ``influence.flag.flag_shortcuts``); the files under scripts/ are argparse shells.
"""
