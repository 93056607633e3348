"""The search wing: the driver, the space, the algorithms, the plan, and the search's bookkeeping.

``python -m emotune.search space=encoders`` (or ``emotune search ...``) runs :func:`emotune.search.driver.main`.
"""
