"""The selection wing: ensembles of a search's best trials (``emotune select-top``) and predictions from them
(``emotune predict``)."""
