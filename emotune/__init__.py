"""emotune: hyperparameter search for multimodal (speech + text) emotion recognition.

Data flows one way through the subpackages: ``data`` (corpus, audio, augmentation, demo corpus) then, in
later steps, ``features`` (frozen encoders and their cache), ``model``, the trial, the search and the
ensemble selection. ``emotune --help`` lists the commands.
"""

__version__ = "0.1.0"
