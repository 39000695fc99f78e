"""The embedded demo, kept apart from the pipeline stages it drives.

- ``influence.demo.digits``: scikit-learn's digits, and the label noise and patch shortcut injected into them;
- ``influence.demo.training``: the training recipe (seeded SGD that saves checkpoints with their learning rates);
- ``influence.demo.run``: ``influence demo``: train on the corrupted digits, build, explain, flag, report;
- ``influence.demo.retrain``: ``influence repair``: act on a demo run's flags, retrain, compare with the ground truth.

The user-facing repair steps (mask, relabel, drop) are in ``influence.repair``.
"""
