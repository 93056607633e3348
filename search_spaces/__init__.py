"""The search spaces (``space/NAME.yaml``, chosen with ``space=NAME``).

This folder is installed as the package ``emotune.search_spaces`` (see pyproject.toml), so the spaces ship
inside the wheel and Hydra finds them with ``pkg://emotune.search_spaces``. A ``search_spaces/space``
folder in the directory you launch from is searched too: put your own spaces there.
"""
