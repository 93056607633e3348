"""emotune: hyperparameter search for multimodal (speech + text) emotion recognition.

Data flows one way, a wing per folder: ``data`` (corpus, audio, augmentation, demo corpus), ``features`` (frozen
encoders and their cache), ``model`` (the heads and the model card), ``trial`` (the unit a search runs),
``search`` (driver, space, algorithms, plan, bookkeeping), ``selection`` (ensembles and predictions) and
``cli``; ``tracking`` (MLflow) is under them all. ``emotune --help`` lists the commands.
"""

__version__ = "0.1.0"
