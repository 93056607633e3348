"""emotune: hyperparameter search for multimodal (speech + text) emotion recognition.

Data flows one way: ``data`` (corpus, audio, augmentation, demo corpus), ``features`` (frozen encoders and
their cache), ``model``, ``trial``, ``search`` (with ``search_resume`` and ``search_report``), ``ensemble``
(selection) and ``predict``; ``checkpoint`` holds what a trained model leaves. ``emotune --help`` lists the
commands.
"""

__version__ = "0.1.0"
